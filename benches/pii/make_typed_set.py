#!/usr/bin/env python3
"""Writes semtel's PII set of the forms people actually type, by category.

    python3 benches/pii/make_typed_set.py tests/fixtures/pii-typed.jsonl
    python3 benches/pii/make_typed_set.py tests/fixtures/pii-typed-heldout.jsonl --variant heldout

Categories (the `category` field; `semtel bench redact` reports recall per category):
password assignments and cued passwords in several languages, card numbers with dots or split
across lines, IBANs split across a line break or across two turns and written in lower case,
obfuscated e-mail addresses ("dot"/"at" spelled out, [at], (at), spaces, fullwidth ＠,
non-ASCII letters), phone numbers in German, French and US formats with slashes, (0), dots and
en dashes, street addresses in German, Dutch, Italian and Japanese, names after a cue in Arabic,
Greek and Korean, cued dates of birth, documented-example and config secrets, and near-misses
that must stay (`near_miss`: no span).

The variants share no template: `dev` is what the recognisers may be tuned on; `heldout` was
written at the same time, before any tuning, with other phrasings and other values; `fresh`
(`--variant fresh`) was written after `heldout` had been read once to find what the first
recognisers missed, before the fixes that reading suggested, so it is the set no change was
ever made for. Every value is synthetic; cards pass Luhn, IBANs mod-97, phone numbers
libphonenumber (checked with the `phonenumbers` package when it is installed).

One JSON object per line: {"id", "category", "lang", "text", "spans": [{"start", "end",
"type"}], "turns"?}, offsets in code points into `text` (turns joined as "role: content" lines,
the way semtel flattens a dialogue).
"""
import json
import random
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
from make_pii_set import luhn_digit, iban_check  # noqa: E402

try:
    import phonenumbers  # optional: validates the generated numbers
except ImportError:
    phonenumbers = None

VARIANT = sys.argv[sys.argv.index("--variant") + 1] if "--variant" in sys.argv else "dev"
R = random.Random({"heldout": 2027, "fresh": 4099}.get(VARIANT, 31))


def digits(n):
    return "".join(str(R.randint(0, 9)) for _ in range(n))


def card_digits():
    prefix = R.choice(["4", "4", str(R.randint(51, 55)), "6011"])
    body = prefix + digits(15 - len(prefix))
    return body + luhn_digit(body)


IBAN_LEN = {"DE": 18, "FR": 23, "ES": 20, "IT": 23, "NL": 14, "BE": 12, "AT": 16}


def iban_compact():
    cc = R.choice(list(IBAN_LEN))
    n = IBAN_LEN[cc]
    if cc == "NL":
        bban = "".join(R.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + digits(10)
    elif cc == "IT":
        bban = R.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + digits(22)
    else:
        bban = digits(n)
    return cc + iban_check(cc, bban) + bban


def grouped(s, k=4, sep=" "):
    return sep.join(s[i:i + k] for i in range(0, len(s), k))


def phone_ok(num, region):
    if phonenumbers is None:
        return True
    clean = num.replace("–", "-").replace("—", "-").replace("(0)", "")
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(clean, region))
    except Exception:
        return False


def phone():
    while True:
        kind = R.choice(["de_land", "de_mobile", "fr", "us_dash", "us_dot", "it", "nl"])
        if kind == "de_land":
            city, rest = R.choice([("30", 8), ("89", 7), ("40", 8), ("69", 8)])
            d = digits(rest)
            if d[0] == "0":
                continue
            fmt = R.choice(["+49 (0) {c} / {a}", "0{c} / {b}", "+49 {c} {b}", "(0{c}) {b}", "0{c}-{b}"])
            num = fmt.format(c=city, a=" ".join(d[i:i + 2] for i in range(0, len(d), 2)), b=d)
            region = "DE"
        elif kind == "de_mobile":
            pre = R.choice(["151", "160", "170", "176"])
            d = digits(8 if pre != "160" else 7)
            if d[0] == "0":
                continue
            fmt = R.choice(["+49 {p} {a} {b}", "0{p}-{a} {b}", "0{p} / {a}{b}", "+49 (0){p} {a}{b}"])
            num = fmt.format(p=pre, a=d[:4], b=d[4:])
            region = "DE"
        elif kind == "fr":
            d = R.choice(["6", "7", "1", "4"]) + digits(8)
            fmt = R.choice(["0{}.{}.{}.{}.{}", "+33 {} {} {} {} {}"])
            parts = [d[0], d[1:3], d[3:5], d[5:7], d[7:9]]
            num = fmt.format(*(["" + parts[0] if fmt.startswith("+") else parts[0]] + parts[1:]))
            region = "FR"
        elif kind in ("us_dash", "us_dot"):
            area = str(R.randint(2, 9)) + digits(2)
            ex = str(R.randint(2, 9)) + digits(2)
            line = digits(4)
            sep = "–" if kind == "us_dash" else "."
            fmt = R.choice(["{a}{s}{e}{s}{l}", "+1 {a}{s}{e}{s}{l}", "({a}) {e}{s}{l}"])
            num = fmt.format(a=area, e=ex, l=line, s=sep)
            region = "US"
        elif kind == "it":
            d = "3" + R.choice(["3", "4", "8", "9"]) + digits(8)
            num = R.choice(["+39 {} {} {}", "{}.{}.{}"]).format(d[:3], d[3:6], d[6:])
            region = "IT"
        else:
            d = "6" + digits(8)
            num = R.choice(["+31 (0){} {} {}", "06-{}{}{}"]).format(d[0], d[1:5], d[5:]) if False else R.choice(["+31 6 {} {}", "06-{} {}"]).format(d[1:5], d[5:])
            region = "NL"
        if phone_ok(num, region):
            return num


DEV = VARIANT == "dev"

# Names per script.
AR_NAMES = ["أحمد حسن", "فاطمة الزهراء", "محمد علي", "سارة خليل", "يوسف منصور", "ليلى عبد الله", "عمر الفاروق", "نور الهدى"]
EL_NAMES = [("Γιώργο Παπαδόπουλο", "Γιώργος Παπαδόπουλος"), ("Μαρία Παπαδοπούλου", "Μαρία Παπαδοπούλου"),
            ("Νίκο Κωνσταντίνου", "Νίκος Κωνσταντίνου"), ("Ελένη Γεωργίου", "Ελένη Γεωργίου"),
            ("Δημήτρη Αλεξίου", "Δημήτρης Αλεξίου"), ("Σοφία Νικολάου", "Σοφία Νικολάου")]
KO_NAMES = ["김민준", "이서연", "박지훈", "최유진", "정하늘", "강도윤", "윤서아", "한지민"]
LATIN_FIRST = ["john", "maria", "peter", "anna", "li", "sofia", "ahmed", "kenji", "lukas", "chloe", "omar", "ingrid"]
LATIN_LAST = ["smith", "lopez", "schmidt", "tanaka", "rossi", "novak", "haddad", "dubois", "berg", "silva"]
NONASCII_LOCAL = ["jürgen.müller", "josé.garcía", "françois.lefèvre", "søren.ærø", "łukasz.wiśniewski", "zoë.brontë", "ömer.çelik", "renée.dubois"]
DOMAINS = [("gmail", "com"), ("outlook", "com"), ("yahoo", "co.jp"), ("web", "de"), ("proton", "me"),
           ("company", "io"), ("uni-bonn", "de"), ("orange", "fr"), ("example", "org")]


def email_parts():
    return R.choice(LATIN_FIRST), R.choice(LATIN_LAST), R.choice(DOMAINS)


def obfuscated_email():
    f, l, (d, tld) = email_parts()
    tlds = tld.split(".")
    style = R.choice(["words", "brackets", "parens", "spaces", "fullwidth", "nonascii", "braces", "caps"] if DEV else
                     ["words", "brackets", "parens", "spaces", "fullwidth", "nonascii", "caps", "mixed"])
    if style == "words":
        return f"{f} dot {l} at {d} dot " + " dot ".join(tlds)
    if style == "brackets":
        return f"{f}.{l} [at] {d} [dot] " + " [dot] ".join(tlds)
    if style == "parens":
        return f"{f}.{l}(at){d}." + ".".join(tlds)
    if style == "spaces":
        return f"{f}.{l} @ {d}." + ".".join(tlds)
    if style == "fullwidth":
        return f"{f}.{l}＠{d}." + ".".join(tlds)
    if style == "nonascii":
        return f"{R.choice(NONASCII_LOCAL)}@{d}." + ".".join(tlds)
    if style == "braces":
        return f"{f}_{l}{{at}}{d}." + ".".join(tlds)
    if style == "caps":
        return f"{f}.{l} AT {d} DOT " + " DOT ".join(tlds).upper()
    # mixed
    return f"{f}{R.randint(1, 99)} (at) {d} (dot) " + " (dot) ".join(tlds)


def password_value():
    words = ["Sommer", "Soleil", "Gato", "hunter", "Dragon", "Fiets", "sakura", "Hund", "azerty", "Pa55", "Tiger", "Luna"]
    return R.choice(words) + R.choice(["#", "!", "_", "", "."]) + str(R.randint(10, 9999))


def dob_value(style):
    y, m, d = R.randint(1950, 2005), R.randint(1, 12), R.randint(1, 28)
    months_en = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
    months_fr = ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre"]
    if style == "slash":
        return f"{d:02d}/{m:02d}/{y}"
    if style == "dot":
        return f"{d:02d}.{m:02d}.{y}"
    if style == "iso":
        return f"{y}-{m:02d}-{d:02d}"
    if style == "en":
        return f"{d} {months_en[m - 1]} {y}"
    if style == "en_us":
        return f"{months_en[m - 1]} {d}, {y}"
    if style == "fr":
        return f"{d} {months_fr[m - 1]} {y}"
    if style == "ja":
        return f"{y}年{m}月{d}日"
    return f"{m}/{d}/{y}"


def aws_like_secret():
    alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    s = [R.choice(alpha) for _ in range(40)]
    for i in R.sample(range(1, 39), 2):
        s[i] = R.choice("/+")
    return "".join(s)


# Each template: a list of turns (role, pieces); a piece is text or (value, TYPE).
def T(*turns):
    return list(turns)


def category_rows(cat, n):
    rows = []
    for _ in range(n):
        rows.append(make(cat))
    return rows


def make(cat):
    """One conversation of a category: (lang, turns)."""
    if cat == "password":
        v = password_value()
        forms = [
            ("en", [("user", ["my .env has ", "DB_PASSWORD=", (v, "SECRET"), " and the app still cannot connect, why?"])]),
            ("en", [("user", ["config:\nhost: db.local\nuser: admin\npass: ", (v, "SECRET"), "\nwhat is wrong with this yaml?"])]),
            ("fr", [("user", ["Mon mot de passe est ", (v, "SECRET"), ", pourquoi est-il refusé ?"])]),
            ("de", [("user", ["Das Passwort ist ", (v, "SECRET"), " aber der Login klappt nicht."])]),
            ("de", [("user", ["Zugangsdaten — Benutzer: kmeier, Passwort: ", (v, "SECRET")])]),
            ("es", [("user", ["usuario: lgarcia contraseña: ", (v, "SECRET"), " no funciona"])]),
            ("ja", [("user", ["パスワードは", (v, "SECRET"), "です。ログインできません。"])]),
            ("en", [("user", ["export PGPASSWORD='", (v, "SECRET"), "' && psql -h db"])]),
        ] if DEV else [
            ("en", [("user", ["in settings.py I have MYSQL_PASSWORD = \"", (v, "SECRET"), "\" is that unsafe?"])]),
            ("en", [("user", ["login: jdoe / pass: ", (v, "SECRET")]), ("assistant", ["Please don't share passwords."])]),
            ("fr", [("user", ["identifiant tmartin, mot de passe : ", (v, "SECRET"), " — ça ne marche pas"])]),
            ("de", [("user", ["mein Passwort: ", (v, "SECRET"), " wird nicht akzeptiert"])]),
            ("de", [("user", ["Kannst du prüfen ob das Kennwort ", (v, "SECRET"), " sicher genug ist?"])]),
            ("es", [("user", ["mi contraseña es ", (v, "SECRET"), " y la olvidé cambiar"])]),
            ("ja", [("user", ["ユーザー名はtanakaでパスワードは", (v, "SECRET"), "です"])]),
            ("it", [("user", ["la mia password è ", (v, "SECRET"), ", è sicura?"])]),
            ("nl", [("user", ["Mijn wachtwoord is ", (v, "SECRET"), " maar inloggen lukt niet"])]),
            ("ru", [("user", ["пароль: ", (v, "SECRET"), " не подходит"])]),
        ]
        return R.choice(forms)
    if cat == "card":
        c = card_digits()
        forms = [
            ("en", [("user", ["my card is ", (grouped(c, sep="."), "CARD"), " can you check it"])]),
            ("en", [("user", ["card number:\n", (c[:8] + "\n" + c[8:], "CARD"), "\nexpires 09/27"])]),
            ("de", [("user", ["Kartennummer ", (grouped(c[:8]) + "\n" + grouped(c[8:]), "CARD"), " wurde belastet"])]),
            ("en", [("user", ["charged twice on ", (grouped(c, sep=" . "), "CARD"), " yesterday"])]),
        ] if DEV else [
            ("en", [("user", ["Visa ", (grouped(c, sep="."), "CARD"), " was declined at checkout"])]),
            ("fr", [("user", ["ma carte : ", (grouped(c[:8]) + "\n" + grouped(c[8:]), "CARD"), " a été débitée deux fois"])]),
            ("en", [("user", ["number is ", (grouped(c[:12]) + "\n" + c[12:], "CARD"), " cvv on the back"])]),
            ("es", [("user", ["tarjeta ", (grouped(c, sep="."), "CARD"), " bloqueada"])]),
        ]
        return R.choice(forms)
    if cat == "iban":
        b = iban_compact()
        g = grouped(b)
        cut = R.choice([2, 3]) * 5 - 1  # after the 2nd or 3rd group
        a, z = g[:cut], g[cut + 1:]
        forms = [
            ("de", [("user", ["Bitte überweisen an\n", (a + "\n" + z, "IBAN"), "\nDanke"])]),
            ("en", [("user", ["my iban is ", (g.lower(), "IBAN"), " is that right?"])]),
            ("en", [("user", ["IBAN: ", (a, "IBAN")]), ("user", [(z, "IBAN"), " sorry it got cut off"])]),
            ("nl", [("user", ["rekeningnummer ", (b.lower(), "IBAN"), " klopt dat?"])]),
        ] if DEV else [
            ("fr", [("user", ["Voici mon IBAN :\n", (a + "\n" + z, "IBAN")])]),
            ("es", [("user", ["cuenta ", (g.lower(), "IBAN"), " para la devolución"])]),
            ("en", [("user", ["send it to ", (a, "IBAN")]), ("assistant", ["That looks incomplete, could you send the rest?"]),
                    ("user", [(z, "IBAN")])]),
            ("de", [("user", ["IBAN ", (a, "IBAN")]), ("user", [(z, "IBAN")])]),
            ("it", [("user", ["il mio iban: ", (b.lower(), "IBAN")])]),
        ]
        return R.choice(forms)
    if cat == "email":
        e = obfuscated_email()
        forms = [
            ("en", [("user", ["you can reach me at ", (e, "EMAIL"), " for the invoice"])]),
            ("en", [("user", ["email: ", (e, "EMAIL")])]),
            ("de", [("user", ["Meine Mail ist ", (e, "EMAIL"), ", bitte antworten"])]),
        ] if DEV else [
            ("en", [("user", ["send the report to ", (e, "EMAIL"), " please"])]),
            ("fr", [("user", ["mon adresse: ", (e, "EMAIL"), " merci"])]),
            ("en", [("user", ["contact ", (e, "EMAIL"), " if it fails again"])]),
            ("es", [("user", ["escríbeme a ", (e, "EMAIL")])]),
        ]
        return R.choice(forms)
    if cat == "phone":
        p = phone()
        forms = [
            ("de", [("user", ["Ruf mich an unter ", (p, "PHONE"), ", ich bin ab 9 da"])]),
            ("en", [("user", ["my number is ", (p, "PHONE")])]),
            ("en", [("user", ["phone: ", (p, "PHONE"), " (evenings)"])]),
        ] if DEV else [
            ("en", [("user", ["text me on ", (p, "PHONE"), " when it ships"])]),
            ("de", [("user", ["Tel. ", (p, "PHONE"), " — bitte zurückrufen"])]),
            ("fr", [("user", ["vous pouvez m'appeler au ", (p, "PHONE")])]),
            ("en", [("user", ["call ", (p, "PHONE"), " tomorrow morning"])]),
        ]
        return R.choice(forms)
    if cat == "address":
        if DEV:
            forms = [
                ("de", "Lieferadresse: ", R.choice(["Kaiserstr. 5a, 60311 Frankfurt am Main", "Hauptstraße 12, 10115 Berlin",
                                                     "Schillerweg 7b, 80331 München", "Bahnhofstr. 23, 70173 Stuttgart"])),
                ("nl", "Mijn adres is ", R.choice(["Keizersgracht 123, 1015 CJ Amsterdam", "Dorpsstraat 45, 3512 AB Utrecht",
                                                   "Stationsweg 8, 2312 AV Leiden"])),
                ("it", "Abito in ", R.choice(["Via Roma 12, 00184 Roma", "Via Giuseppe Garibaldi 7, 20121 Milano",
                                              "Piazza della Signoria 3, 50122 Firenze"])),
                ("ja", "住所は", R.choice(["〒100-0005 東京都千代田区丸の内1-1-1", "大阪府大阪市北区梅田3丁目1-1", "東京都渋谷区神南1-2-3"])),
            ]
        else:
            forms = [
                ("de", "Bitte schicken an ", R.choice(["Goethestraße 17, 04109 Leipzig", "Marktplatz 4, 69117 Heidelberg",
                                                       "Berliner Str. 88, 40212 Düsseldorf", "Lindenallee 2c, 50968 Köln"])),
                ("nl", "bezorgen op ", R.choice(["Prinsengracht 263, 1016 GV Amsterdam", "Kerkstraat 10, 5611 GH Eindhoven",
                                                 "Oude Gracht 92, 3511 AX Utrecht"])),
                ("it", "indirizzo di consegna: ", R.choice(["Corso Buenos Aires 33, 20124 Milano", "Via del Corso 120, 00186 Roma",
                                                            "Viale Europa 45, 50126 Firenze"])),
                ("ja", "配送先：", R.choice(["〒530-0001 大阪府大阪市北区梅田2-4-9", "京都府京都市左京区吉田本町36-1",
                                          "東京都新宿区西新宿2丁目8-1"])),
            ]
        lang, cue, addr = R.choice(forms)
        return (lang, [("user", [cue, (addr, "ADDRESS"), R.choice([" — danke", ". ", "", " 。"]) if lang != "ja" else "です。"])])
    if cat == "name":
        if DEV:
            forms = [
                ("ar", lambda: ["اسمي ", (R.choice(AR_NAMES), "PERSON"), " وأحتاج مساعدة في طلبي"]),
                ("el", lambda: ["Με λένε ", (R.choice(EL_NAMES)[0], "PERSON"), " και έχω ένα πρόβλημα"]),
                ("ko", lambda: ["제 이름은 ", (R.choice(KO_NAMES), "PERSON"), "입니다. 주문 확인 부탁드려요"]),
            ]
        else:
            forms = [
                ("ar", lambda: ["مرحبا، أنا اسمي ", (R.choice(AR_NAMES), "PERSON"), " من القاهرة"]),
                ("el", lambda: ["Το όνομά μου είναι ", (R.choice(EL_NAMES)[1], "PERSON"), ", χρειάζομαι βοήθεια"]),
                ("ko", lambda: ["안녕하세요, 제 이름은 ", (R.choice(KO_NAMES), "PERSON"), "이에요"]),
                ("el", lambda: ["Ονομάζομαι ", (R.choice(EL_NAMES)[1], "PERSON"), " και θέλω να ακυρώσω"]),
            ]
        lang, f = R.choice(forms)
        return (lang, [("user", f())])
    if cat == "dob":
        if DEV:
            forms = [
                ("en", ["DOB: ", ("slash", "DATE_OF_BIRTH")]),
                ("en", ["my date of birth is ", ("en", "DATE_OF_BIRTH"), " and the form rejects it"]),
                ("de", ["Geburtsdatum: ", ("dot", "DATE_OF_BIRTH")]),
                ("fr", ["je suis né le ", ("fr", "DATE_OF_BIRTH"), " à Lyon"]),
            ]
        else:
            forms = [
                ("en", ["I was born on ", ("en_us", "DATE_OF_BIRTH"), ", does that make me eligible?"]),
                ("en", ["date of birth ", ("iso", "DATE_OF_BIRTH")]),
                ("de", ["geboren am ", ("dot", "DATE_OF_BIRTH"), " in Hamburg"]),
                ("es", ["fecha de nacimiento: ", ("slash", "DATE_OF_BIRTH")]),
                ("ja", ["生年月日は", ("ja", "DATE_OF_BIRTH"), "です"]),
            ]
        lang, pieces = R.choice(forms)
        out = [p if isinstance(p, str) else (dob_value(p[0]), p[1]) for p in pieces]
        return (lang, [("user", out)])
    if cat == "secret":
        example = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        if DEV:
            forms = [
                ["aws_secret_access_key = ", (aws_like_secret(), "SECRET")],
                ["[default]\naws_secret_access_key=", (aws_like_secret(), "SECRET"), "\nregion = eu-west-1"],
                ["the docs key ", (example, "SECRET"), " — is it real?"],
            ]
        else:
            forms = [
                ["AWS_SECRET_ACCESS_KEY=", (aws_like_secret(), "SECRET"), " in my CI log, should I rotate?"],
                ["I copied ", (example, "SECRET"), " into my script"],
                ["secret key: ", (aws_like_secret(), "SECRET")],
                ["example from the AWS docs: ", (example, "SECRET")],
            ]
        return ("en", [("user", R.choice(forms))])
    # near_miss: text that looks like the above and must stay as it is.
    pool = [
        ("en", "The password must be at least 12 characters long, how do I change it?"),
        ("en", "Look at this dot com bubble chart from 2000."),
        ("de", "Ich habe mein Passwort vergessen, wie setze ich es zurück?"),
        ("it", "Via Appia è una strada romana antica."),
        ("en", "The meeting is on 12.03.2026 at 10:30."),
        ("en", "Upgrade to version 4.12.1 fixes the crash."),
        ("de", "Das kostet 1.299,00 € inklusive Versand."),
        ("en", "My birthday party is on Saturday, can you suggest a cake?"),
        ("fr", "Le mot de passe doit contenir un chiffre."),
        ("en", "An IBAN starts with two letters and two check digits."),
        ("ja", "パスワードを忘れました。どうすればいいですか？"),
        ("en", "Meet me at noon dot"),
        ("nl", "Het wachtwoord is verlopen, hoe reset ik het?"),
        ("en", "Frankfurt am Main is expensive to live in."),
        ("en", "I was born in the nineties and love retro games."),
        ("de", "Die Hauptstraße ist wegen Bauarbeiten gesperrt."),
        ("en", "Set PASSWORD_MIN_LENGTH in the config to 12."),
        ("el", "Με λένε συχνά ότι μιλάω γρήγορα."),
        ("ko", "제 이름은 나중에 알려드릴게요."),
        ("en", "What does the token limit of 4096 mean?"),
        ("en", "Score was 3 – 1 at half time and 4 – 2 at the end."),
        ("en", "Use the pattern user at domain dot tld when you write it out."),
        ("es", "La contraseña es obligatoria para crear la cuenta."),
        ("en", "Lines 12.5.3 and 12.5.4 of the spec disagree."),
    ] if DEV else [
        ("en", "Your password: must contain a symbol and a number."),
        ("en", "He arrived at home dot on time, as always."),
        ("de", "Das Passwort ist zu kurz, sagt die Fehlermeldung."),
        ("it", "Piazza Navona è bellissima di sera."),
        ("en", "The release on 03.04.2025 broke the build."),
        ("en", "Section 2.3.1 explains the retry policy."),
        ("fr", "Le prix est de 2.499,99 € TTC."),
        ("en", "What should I get my dad for his 60th birthday?"),
        ("fr", "mot de passe oublié : que faire ?"),
        ("en", "How is an IBAN check digit computed?"),
        ("ja", "パスワードは8文字以上にしてください。"),
        ("en", "Born to run is my favourite album."),
        ("nl", "Wachtwoord vergeten? Klik op de link."),
        ("de", "Berliner Str. ist eine häufige Straßenname in Deutschland."),
        ("en", "Keep the api key out of version control."),
        ("el", "Το όνομά μου δεν έχει σημασία εδώ."),
        ("ar", "اسمي غير مهم، أريد فقط معرفة السعر."),
        ("en", "Wins 10–4, 8–6 and 7–5 in the tournament."),
        ("en", "The secret is to let the dough rest overnight."),
        ("es", "¿Cuál es la contraseña del wifi del hotel? No la tengo."),
        ("en", "Chapter 4.2.7 covers the proof."),
        ("de", "geboren in Hamburg, aufgewachsen in Köln"),
        ("en", "Population 1.234.567 in the 2020 census."),
        ("en", "Type your email as name at company dot com in the form? No, use the @ sign."),
    ]
    lang, text = R.choice(pool)
    return lang, [("user", [text])]


def make_fresh(cat):
    """The `fresh` variant's conversations: other phrasings, other values."""
    if cat == "password":
        v = password_value()
        forms = [
            ("en", ["here are my creds: username bob, password ", (v, "SECRET")]),
            ("en", ["REDIS_PASSWORD: ", (v, "SECRET"), "\nREDIS_HOST: cache.internal"]),
            ("de", ["Neues Passwort lautet ", (v, "SECRET"), " – bitte nicht weitergeben"]),
            ("fr", ["le mdp c'est ", (v, "SECRET")]),
            ("es", ["la clave del router es ", (v, "SECRET")]),
            ("pt", ["minha senha: ", (v, "SECRET"), " não funciona"]),
            ("zh", ["我的密码是", (v, "SECRET"), "，登录失败"]),
            ("ko", ["비밀번호는 ", (v, "SECRET"), " 입니다"]),
            ("en", ["connection string has Password=", (v, "SECRET"), ";Encrypt=True"]),
        ]
    elif cat == "card":
        c = card_digits()
        forms = [
            ("en", ["pls refund ", (grouped(c, sep="-"), "CARD"), " asap"]),
            ("en", ["card:\n", (grouped(c[:8], sep=".") + "\n" + grouped(c[8:], sep="."), "CARD")]),
            ("it", ["carta ", (grouped(c), "CARD"), " rifiutata"]),
            ("de", ["Karte ", (grouped(c, sep="."), "CARD"), ", Ablauf 11/28"]),
        ]
    elif cat == "iban":
        b = iban_compact()
        g = grouped(b)
        cut = R.choice([2, 3, 4]) * 5 - 1
        a, z = g[:cut], g[cut + 1:]
        return R.choice([
            ("en", [("user", ["refund to ", (g.lower(), "IBAN")])]),
            ("de", [("user", ["Konto:\n", (a, "IBAN"), "\n", (z, "IBAN")])]),
            ("en", [("user", ["account ", (a, "IBAN"), "..."]), ("user", [(z, "IBAN"), " is the rest"])]),
            ("nl", [("user", ["mijn IBAN ", (a, "IBAN")]), ("assistant", ["Ik mis een deel."]), ("user", ["sorry: ", (z, "IBAN")])]),
        ])
    elif cat == "email":
        e = obfuscated_email()
        forms = [
            ("en", ["my email is ", (e, "EMAIL")]),
            ("en", ["ping me: ", (e, "EMAIL")]),
            ("de", ["E-Mail: ", (e, "EMAIL"), " (privat)"]),
            ("it", ["scrivetemi a ", (e, "EMAIL"), " grazie"]),
        ]
    elif cat == "phone":
        p = phone()
        forms = [
            ("en", ["mobile ", (p, "PHONE")]),
            ("en", ["reach me on ", (p, "PHONE"), " after 6pm"]),
            ("de", ["Telefon: ", (p, "PHONE")]),
            ("fr", ["mon portable : ", (p, "PHONE")]),
        ]
    elif cat == "address":
        lang, cue, addr = R.choice([
            ("de", "ich wohne in der ", R.choice(["Schloßstraße 41, 01067 Dresden", "Hafenweg 3a, 48155 Münster", "Königsallee 60, 40212 Düsseldorf"])),
            ("nl", "adres: ", R.choice(["Herengracht 502, 1017 CB Amsterdam", "Molenweg 17, 6542 JK Nijmegen"])),
            ("it", "spedire a ", R.choice(["Via Nazionale 91, 00184 Roma", "Piazza San Marco 1, 30124 Venezia", "Corso Italia 14, 20122 Milano"])),
            ("ja", "住所：", R.choice(["〒460-0008 愛知県名古屋市中区栄3-5-1", "福岡県福岡市博多区博多駅前2-1-1", "北海道札幌市中央区北1条西2丁目1"])),
        ])
        return (lang, [("user", [cue, (addr, "ADDRESS")])])
    elif cat == "name":
        forms = [
            ("ar", ["اسمي ", (R.choice(AR_NAMES), "PERSON")]),
            ("el", ["Με λένε ", (R.choice(EL_NAMES)[0], "PERSON"), "."]),
            ("ko", ["제 이름은 ", (R.choice(KO_NAMES), "PERSON"), "이고 회원번호를 잊어버렸어요"]),
            ("el", ["Λέγομαι ", (R.choice(EL_NAMES)[1], "PERSON"), " και χρειάζομαι ένα τιμολόγιο"]),
        ]
    elif cat == "dob":
        lang, pieces = R.choice([
            ("en", ["DOB ", ("dot", "DATE_OF_BIRTH"), " — can you check my age"]),
            ("en", ["born ", ("en", "DATE_OF_BIRTH")]),
            ("de", ["Geburtsdatum ", ("iso", "DATE_OF_BIRTH")]),
            ("fr", ["date de naissance : ", ("slash", "DATE_OF_BIRTH")]),
            ("it", ["data di nascita ", ("slash", "DATE_OF_BIRTH")]),
        ])
        return (lang, [("user", [p if isinstance(p, str) else (dob_value(p[0]), p[1]) for p in pieces])])
    elif cat == "secret":
        forms = [
            ("en", ["aws secret: ", (aws_like_secret(), "SECRET")]),
            ("en", ["is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"[:3], ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "SECRET"), " a real key?"]),
            ("en", ["credentials file says aws_secret_access_key: ", (aws_like_secret(), "SECRET")]),
        ]
    else:
        pool = [
            ("en", "Where do I change my password? The settings page is confusing."),
            ("en", "I'm at the office dot matrix printer again, it jams."),
            ("de", "Das Passwort muss mindestens 8 Zeichen haben."),
            ("it", "Corso di italiano a Roma, quanto costa?"),
            ("en", "Version 3.10.4 was released on 2024-06-06."),
            ("fr", "Il coûte 1.250,00 € par mois."),
            ("en", "What's a good birthday gift for a 5 year old?"),
            ("en", "Secret santa rules for the office?"),
            ("ja", "パスワードの変更方法を教えてください。"),
            ("ko", "비밀번호를 잊어버렸어요. 어떻게 재설정하나요?"),
            ("en", "Results: 12–9, 10–8, 11–13."),
            ("en", "Is an IBAN the same as a SWIFT code?"),
            ("de", "Die Schloßstraße ist heute gesperrt."),
            ("en", "Email me at your convenience about the schedule."),
            ("ar", "اسمي الحقيقي لا يهم هنا."),
        ]
        lang, text = R.choice(pool)
        return lang, [("user", [text])]
    lang, pieces = R.choice(forms)
    return lang, [("user", pieces)]


def render(lang, turns, cat, i):
    text, spans, out_turns = "", [], []
    for k, (role, pieces) in enumerate(turns):
        if k:
            text += "\n"
        text += role + ": "
        content = ""
        for p in pieces:
            if isinstance(p, tuple):
                v, typ = p
                start = len(text)
                text += v
                content += v
                if typ and v:
                    spans.append({"start": start, "end": len(text), "type": typ})
            else:
                text += p
                content += p
        out_turns.append({"role": role, "content": content})
    row = {"id": f"typed-{VARIANT}-{i:04d}", "category": cat, "lang": lang, "text": text, "spans": spans}
    if len(out_turns) > 1:
        row["turns"] = out_turns
    else:
        # One message: the text alone (no role prefix), offsets shifted.
        shift = len(turns[0][0]) + 2
        row["text"] = text[shift:]
        for s in spans:
            s["start"] -= shift
            s["end"] -= shift
    return row


CATS = ["password", "card", "iban", "email", "phone", "address", "name", "dob", "secret", "near_miss"]


def main():
    out = sys.argv[1]
    per = {"dev": 24, "heldout": 20, "fresh": 15}[VARIANT]
    rows = []
    for cat in CATS:
        for _ in range(per * (2 if cat == "near_miss" else 1)):
            lang, turns = make_fresh(cat) if VARIANT == "fresh" else make(cat)
            rows.append(render(lang, turns, cat, len(rows)))
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
