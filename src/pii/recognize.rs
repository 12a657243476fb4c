//! The recognisers: each finds candidate spans with a regular expression, then keeps only
//! those that pass the format's own check (Luhn for cards, mod-97 for IBANs, check digits
//! for national ids, base58check/bech32 for wallets, the phone-number metadata of
//! `phonenumber`) or that sit next to a cue word (names, addresses, unformatted ids). The
//! near-misses semtel must leave alone (order numbers, dates, prices, version strings, ISBNs)
//! are refused by those checks and by negative context.
//!
//! Pure functions over `&str`; every span is a regex match or a sub-match, so on character
//! boundaries. This module must never panic on any input (property-tested) and never keeps
//! what it finds.

use super::{Kind, Span};
use crate::{Error, Result};
use regex::Regex;

/// The name of a credential, possibly inside an identifier (`DB_PASSWORD`, `pwd_hash` is not
/// one: only suffixes that are words); groups: the whole name, then its cue word.
const CREDENTIAL_NAME: &str = concat!(
    r#"(?i)(?:^|[^\p{L}\p{N}]|[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}])((?:[a-z0-9]+[_\-.]?)*?"#,
    r#"(password|passwd|passwort|kennwort|passphrase|passcode|pass|pwd|pw|pin|secret|"#,
    r#"api[_\-]?key|access[_\-]?token|auth[_\-]?token|bearer|client[_\-]?secret|private[_\-]?key|"#,
    r#"secret[_\-]?access[_\-]?key|token|mot de passe|mdp|contraseña|contrasena|clave|senha|"#,
    r#"wachtwoord|hasło|haslo|heslo|lösenord|losenord|adgangskode|passord|salasana|şifre|sifre|"#,
    r#"parola|пароль|密码|密碼|パスワード|暗証番号|비밀번호|암호|كلمة المرور|كلمة السر|पासवर्ड)"#,
    r#"(?:[_\-][a-z0-9]+)*)"#,
);

/// A credential's value: printable ASCII without quotes or list punctuation.
const CREDENTIAL_VALUE: &str = r#"[\x21-\x7E&&[^"',;<>`]]{3,}"#;

/// Regions whose national phone formats are tried for numbers without a `+`.
const DEFAULT_PHONE_REGIONS: &[&str] = &[
    "US", "GB", "CA", "AU", "IN", "DE", "FR", "ES", "IT", "NL", "BR", "MX", "JP", "CN", "RU", "ZA",
];

/// Words before a number that say it is not a phone number (or not personal at all).
const NOT_PHONE_CUES: &[&str] = &[
    "order",
    "invoice",
    "isbn",
    "ref",
    "reference",
    "tracking",
    "serial",
    "sku",
    "ticket",
    "case",
    "version",
    "build",
    "model",
    "part",
    "item",
    "po ",
    "booking",
    "confirmation",
    "transaction",
    "txn",
    "account no",
    "product",
    "id:",
    "id ",
    "#",
    "no.",
    "nr.",
    "v.",
    // Other identifiers: a number that fails their check is not a phone number either.
    "cpf",
    "ssn",
    "dni",
    "nie",
    "nif",
    "iban",
    "card",
    "aadhaar",
    "nino",
    "vat",
    "tax",
    "passport",
    "licen",
    "policy",
    "member",
    "acct",
    "routing",
    "zip",
    "postal",
    "pin",
    // Invoices and orders in other languages.
    "facture",
    "commande",
    "rechnung",
    "bestellung",
    "auftrag",
    "factura",
    "pedido",
    "fattura",
    "ordine",
    "fatura",
    "encomenda",
    "bestelling",
    "заказ",
    "счёт",
    "счет",
    "订单",
    "發票",
    "发票",
    "注文",
    "請求書",
    "주문",
];

/// Words before a dotted number that make it a version.
const VERSION_CUES: &[&str] = &[
    "version",
    "versión",
    "versione",
    "versão",
    "release",
    "build",
    "firmware",
    "update to",
    "upgrade to",
    "版本",
    "バージョン",
    "версия",
    "버전",
];

/// Words before a number that say it is a phone number.
const PHONE_CUES: &[&str] = &[
    "phone",
    "tel",
    "call",
    "mobile",
    "cell",
    "text me",
    "sms",
    "whatsapp",
    "reach me",
    "contact",
    "fax",
    "number is",
    "ring me",
    "dial",
    "电话",
    "手机",
    "телефон",
    "тел",
    "téléphone",
    "telephone",
    "teléfono",
    "telefone",
    "telefono",
    "handy",
    "rufnummer",
    "nummer",
    "número",
    "numero",
    "portable",
    "móvil",
    "携帯",
    "電話",
    "전화",
    "هاتف",
    "फ़ोन",
    "फोन",
    "мобил",
];

/// Greeting or signature words that are not names.
const NOT_NAMES: &[&str] = &[
    "Sir",
    "Madam",
    "Madame",
    "Team",
    "All",
    "Everyone",
    "There",
    "Customer",
    "Customers",
    "Support",
    "Friend",
    "Friends",
    "World",
    "Guys",
    "Folks",
    "Again",
    "Hiring",
    "Manager",
    "Colleagues",
    "Assistant",
    "ChatGPT",
    "Claude",
    "Gemini",
    "Copilot",
    "Bot",
    "GPT",
    "AI",
    "Siri",
    "Alexa",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Thanks",
    "Thank",
    "Regards",
    "Best",
    "Hello",
    "Hi",
    "Hey",
    "Dear",
    "Please",
    "Can",
    "Could",
    "Would",
    "Will",
    "What",
    "How",
    "Why",
    "When",
    "Where",
    "Who",
    "I",
    "The",
    "A",
    "An",
    "It",
    "This",
    "That",
    "Yes",
    "No",
    "Ok",
    "Okay",
    "Sorry",
    "Good",
    "Morning",
    "Evening",
    "Afternoon",
    "Night",
    "Mr",
    "Mrs",
    "Ms",
    "Dr",
    "Prof",
    "Also",
    "And",
    "But",
    "So",
    "My",
    "Your",
    "Our",
    "Their",
    "Here",
    "Just",
    "Not",
    "Very",
    "Happy",
    "Glad",
    "Sure",
    "Great",
    "New",
    "Old",
    "User",
    "Admin",
    "Human",
    "Model",
    "Python",
    "Rust",
    "Java",
    "English",
    "Spanish",
    "French",
    "German",
    "Chinese",
    "Sales",
    "Billing",
    "Hr",
    "It's",
    "I'm",
    "Im",
];

pub struct Recognizers {
    email: Regex,
    iban_start: Regex,
    assign_loose: Regex,
    email_obfuscated: Regex,
    aws_secret: Regex,
    dob: Regex,
    address_nl: Regex,
    address_it: Regex,
    address_ja: Regex,
    person_ar: Regex,
    phone: Regex,
    card: Regex,
    iban: Regex,
    ipv4: Regex,
    ipv6: Regex,
    url: Regex,
    ssn: Regex,
    ssn_plain: Regex,
    dni: Regex,
    nie: Regex,
    cpf: Regex,
    aadhaar: Regex,
    nino: Regex,
    nir: Regex,
    codice: Regex,
    secret: Regex,
    assign: Regex,
    pem: Regex,
    entropy: Regex,
    hex: Regex,
    btc: Regex,
    bech32: Regex,
    eth: Regex,
    address: Regex,
    address_de: Regex,
    address_fr: Regex,
    address_es: Regex,
    postcode_uk: Regex,
    person: Regex,
    person_sig: Regex,
    person_weak: Regex,
    person_cjk: Regex,
    phone_regions: Vec<phonenumber::country::Id>,
}

fn re(p: &str) -> Regex {
    // The patterns are this module's constants: a bad one is a bug caught by the unit tests.
    Regex::new(p).unwrap_or_else(|e| panic!("pii pattern {p}: {e}"))
}

// A middle initial needs its dot ("John F. Kennedy"): without it, the first letter of the
// surname would end the match ("Maria G|onzalez"). Particles join surnames ("de Vries").
const NAME: &str = r"\p{Lu}[\p{Ll}\p{Lo}'’\-]*\p{Ll}(?:[ ]\p{Lu}\.)?(?:[ ](?:(?:de|da|del|van|von|der|di|le|la|du|dos|bin|al)[ ])?\p{Lu}[\p{Ll}'’\-]*\p{Ll}){0,2}";

/// `phonenumber`'s default database compiles its metadata patterns lazily into one shared
/// LRU cache of 100 entries; validating a national number against 16 regions touches several
/// hundred, so the cache thrashes and every number recompiles patterns (measured: most of the
/// redaction time). Enlarging it once keeps every pattern compiled. The cache is the crate's
/// own (process-wide by its design); this changes its size only, never what it answers.
fn enlarge_phone_pattern_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(mut c) = phonenumber::metadata::DATABASE.cache().lock() {
            *c = regex_cache::RegexCache::new(4096);
        }
    });
}

impl Recognizers {
    pub fn new(regions: Option<&[String]>) -> Result<Recognizers> {
        enlarge_phone_pattern_cache();
        let phone_regions = match regions {
            Some(rs) => rs
                .iter()
                .map(|r| {
                    r.trim()
                        .to_uppercase()
                        .parse::<phonenumber::country::Id>()
                        .map_err(|_| {
                            Error::Config(format!(
                                "redaction phone_regions: `{r}` is not an ISO 3166 region code"
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?,
            None => DEFAULT_PHONE_REGIONS
                .iter()
                .filter_map(|r| r.parse().ok())
                .collect(),
        };
        Ok(Recognizers {
            // Letters of any script in both parts (`jürgen.müller@web.de`, IDN domains).
            email: re(
                r"[\p{L}\p{N}_%+\-](?:[\p{L}\p{N}._%+\-]{0,62}[\p{L}\p{N}_%+\-])?@(?:[\p{L}\p{N}](?:[\p{L}\p{N}\-]{0,61}[\p{L}\p{N}])?\.)+\p{L}{2,24}",
            ),
            // Addresses written to dodge scrapers: `john dot smith at gmail dot com`,
            // `ana [at] mail [dot] com`, `li(at)x.io`, `peter @ example.org`. Group 1 is the
            // `at` that joins the parts (checked in `email_obfuscation_ok`).
            email_obfuscated: re(concat!(
                r"(?i)(?-u:\b)[\p{L}\p{N}_%+\-](?:[\p{L}\p{N}._%+\-]*[\p{L}\p{N}_%+\-])?",
                r"(?:[ ]+dot[ ]+[\p{L}\p{N}_%+\-]+|[ ]*[\[({<][ ]*dot[ ]*[\])}>][ ]*[\p{L}\p{N}_%+\-]+)*",
                r"([ ]*@[ ]*|[ ]*[\[({<][ ]*at[ ]*[\])}>][ ]*|[ ]+at[ ]+)",
                r"[\p{L}\p{N}](?:[\p{L}\p{N}\-]*[\p{L}\p{N}])?",
                r"(?:(?:[ ]*\.[ ]*|[ ]*[\[({<][ ]*dot[ ]*[\])}>][ ]*|[ ]+dot[ ]+)[\p{L}\p{N}](?:[\p{L}\p{N}\-]*[\p{L}\p{N}])?)+",
            )),
            // Separators people put in numbers: spaces, dashes (en and em dashes too), dots,
            // slashes with spaces around them, `(0)`, and a line break where the text wrapped.
            phone: re(
                r"(?:(?:\+|00)[ ]?)?(?:\([0-9]{1,5}\)[ ]?)?[0-9](?:(?:[ ]?[./\-\u{2010}-\u{2014}][ ]?|[ ]|[ ]?\r?\n[ ]?)?(?:\([0-9]{1,5}\)|[0-9])){5,17}",
            ),
            card: re(r"[0-9](?:(?:[ ]?[\-.][ ]?|[ ]|[ ]?\r?\n[ ]?)?[0-9]){12,18}"),
            // The first groups of an IBAN whose rest comes later (`iban_continued`).
            iban_start: re(r"(?i)(?-u:\b)[A-Z]{2}[0-9]{2}(?:[ \-]?[A-Z0-9]{4}){1,6}(?-u:\b)"),
            iban: re(
                r"(?i)[A-Z]{2}[0-9]{2}(?:(?:[ \-]|[ ]?\r?\n[ ]?)?[A-Z0-9]{4}){2,7}(?:(?:[ \-]|[ ]?\r?\n[ ]?)?[A-Z0-9]{1,4})?",
            ),
            ipv4: re(
                r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}",
            ),
            ipv6: re(r"(?i)(?:[0-9a-f]{1,4}:|::)[0-9a-f:]*:[0-9a-f:.]*[0-9a-f]"),
            url: re(
                r#"(?i)\b(?:https?|ftps?|sftp|wss?|postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|amqps?|smtp)://[^\s<>"'`]+"#,
            ),
            ssn: re(r"[0-9]{3}([- ])[0-9]{2}([- ])[0-9]{4}"),
            ssn_plain: re(r"[0-9]{9}"),
            dni: re(r"[0-9]{8}[- ]?[A-HJ-NP-TV-Z]"),
            nie: re(r"[XYZ][- ]?[0-9]{7}[- ]?[A-HJ-NP-TV-Z]"),
            cpf: re(r"[0-9]{3}\.?[0-9]{3}\.?[0-9]{3}-?[0-9]{2}"),
            aadhaar: re(r"[2-9][0-9]{3}([ \-]?)[0-9]{4}([ \-]?)[0-9]{4}"),
            nino: re(
                r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]\b",
            ),
            nir: re(
                r"[12] ?[0-9]{2} ?(?:0[1-9]|1[0-2]|[2-9][0-9]) ?(?:2[AB]|[0-9]{2}) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}",
            ),
            codice: re(
                r"(?i)\b[A-Z]{6}[0-9LMNPQRSTUV]{2}[ABCDEHLMPRST][0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{3}[A-Z]\b",
            ),
            secret: re(concat!(
                r"\bsk-(?:proj-|ant-(?:api03-)?|live-|svcacct-)?[A-Za-z0-9_\-]{20,}",
                r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA)[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
                r"|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
                r"|\bglpat-[A-Za-z0-9_\-]{20,}",
                r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}",
                r"|\bAIza[0-9A-Za-z_\-]{35}",
                r"|\b(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b",
                r"|\bhf_[A-Za-z0-9]{30,}\b",
                r"|\bnpm_[A-Za-z0-9]{36}\b",
                r"|\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}",
                r"|\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
            )),
            // A credential after its name: `password: x`, `DB_PASSWORD=x` (the name inside an
            // environment variable or key), `Passwort ist x`, `パスワードはx`. Group 1 is the
            // name, 2 its cue word, 3 the connector, 4 the value (checked in
            // `credential_ok`). Scripts written without spaces do not glue a word to the name
            // (`…でパスワードは…`).
            assign: re(&format!(
                r#"{CREDENTIAL_NAME}["']?(\s*[:=：]\s*|\s+(?:is|ist|est|es|è|é|er|är|jest|je|это|era|was|lautet|c'est|c’est|are|sind|sont|son)\s+|\s*(?:は|是|为|為|은|는)\s*)["'“«]?({CREDENTIAL_VALUE})"#
            )),
            // The loose form: up to three words between name and connector (`la clave del
            // router es x`), or no connector at all (`password x`); only a value shaped like a
            // secret is taken (`credential_loose_ok`). Groups as above, 3 the words between.
            assign_loose: re(&format!(
                r#"{CREDENTIAL_NAME}((?:[ ]+[\p{{L}}'’]{{1,12}}){{0,3}})(\s*[:=：]\s*|\s+(?:is|ist|est|es|è|é|er|är|lautet|c'est|c’est|are|sind|sont|son)\s+|[ ]+)["'“«]?({CREDENTIAL_VALUE})"#
            )),
            aws_secret: re(r"(?:^|[\s=:'\x22(])([A-Za-z0-9/+]{40})(?:$|[\s'\x22),.;])"),
            // A date right after a birth cue, in the common written forms.
            dob: re(concat!(
                r"(?i)(?:(?-u:\b)(?:date of birth|birth ?date|d\.?o\.?b\.?|born(?: on)?|birthday(?: is)?|",
                r"geburtsdatum|geboren(?: am)?|geb\.|date de naissance|n[ée]e? le|fecha de nacimiento|",
                r"nacid[oa] (?:el )?|data di nascita|nat[oa] il|data de nascimento|nascid[oa] em|",
                r"geboortedatum|geboren op|дата рождения|родил(?:ся|ась))|生年月日|出生日期|生日)",
                r"[\s:：は是为]*(?:is |was |am |le |el |il |em |op )?",
                r"(\d{1,2}[./\-]\d{1,2}[./\-](?:19|20)\d{2}|(?:19|20)\d{2}[./\-]\d{1,2}[./\-]\d{1,2}|",
                r"(?:19|20)\d{2}年\d{1,2}月\d{1,2}日|",
                r"\d{1,2}\.?[ ](?:\p{L}{3,12}\.?)[ ](?:19|20)\d{2}|",
                r"\p{L}{3,12}\.?[ ]\d{1,2}(?:st|nd|rd|th)?,?[ ](?:19|20)\d{2})",
            )),
            pem: re(
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
            ),
            entropy: re(r"[A-Za-z0-9+/_\-]{24,}={0,2}"),
            hex: re(r"\b[0-9a-fA-F]{32,128}\b"),
            btc: re(r"[13LM][1-9A-HJ-NP-Za-km-z]{25,34}"),
            bech32: re(r"(?i)(?:bc1|tb1|ltc1)[02-9ac-hj-np-z]{11,87}"),
            eth: re(r"0x[0-9a-fA-F]{40}"),
            address: re(
                r"\b[0-9]{1,6}[A-Za-z]?(?:[ ](?:[NSEW]\.?|North|South|East|West))?(?:[ ][A-Z][A-Za-z'\-]+){1,4}[ ](?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Square|Sq|Terrace|Way|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Trail|Crescent|Close|Grove|Gardens|Mews|Row)\b\.?(?:,?[ ]*(?:Apt|Apartment|Suite|Ste|Unit|Flat|#)\.?[ ]*[0-9A-Za-z\-]+)?(?:,[ ]*[A-Z][A-Za-z .'\-]{1,30},[ ]*[A-Z]{2}[ ]+[0-9]{5}(?:-[0-9]{4})?)?",
            ),
            // `Hauptstraße 12`, `Kaiserstr. 5a`, `Berliner Str. 88`, `Am Markt 3`, with the
            // postcode and town when they follow (`60311 Frankfurt am Main`).
            address_de: re(concat!(
                r"(?-u:\b)(?:\p{Lu}\p{Ll}+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|chaussee|steig|pfad|markt)",
                r"|\p{Lu}\p{Ll}+[ ](?:Straße|Strasse|Str\.|Weg|Gasse|Platz|Allee|Ring|Damm|Ufer|Chaussee)",
                r"|Am[ ]\p{Lu}\p{Ll}+)",
                r"[ ]+[0-9]{1,4}[ ]?[a-z]?(?-u:\b)",
                r"(?:,?[ ]*[0-9]{5}[ ]+\p{Lu}\p{Ll}+(?:[ ](?:am|an der|im|in der|ob der)[ ]\p{Lu}\p{Ll}+|-\p{Lu}\p{Ll}+)?)?",
            )),
            // `Keizersgracht 123`, `Oude Gracht 92`, with `1015 CJ Amsterdam`.
            address_nl: re(concat!(
                r"(?-u:\b)(?:\p{Lu}\p{Ll}+(?:straat|gracht|weg|laan|plein|kade|singel|dijk|steeg|dreef|markt|park|hof)",
                r"|\p{Lu}\p{Ll}+[ ](?:Gracht|Straat|Weg|Laan|Plein|Kade|Singel|Dijk|Markt))",
                r"[ ]+[0-9]{1,4}[ ]?[a-zA-Z]?(?-u:\b)",
                r"(?:,?[ ]*[0-9]{4}[ ]?[A-Z]{2}[ ]+\p{Lu}\p{Ll}+(?:[ ]\p{Lu}\p{Ll}+)?)?",
            )),
            // `Via Roma 12`, `Piazza della Signoria 3`, `Corso Vittorio Emanuele II 45`, with
            // `00184 Roma`.
            address_it: re(concat!(
                r"(?-u:\b)(?:Via|Viale|Piazza|Piazzale|Corso|Largo|Vicolo|Strada|Lungomare|Lungotevere|Contrada|Borgo)",
                r"[ ]+(?:(?:del|della|dei|degli|delle|dello|di|da|dal|dalla|San|Santa|Sant')[ ]+)*",
                r"\p{Lu}[\p{L}'’\-]+(?:[ ]+(?:\p{Lu}[\p{L}'’\-]+|[IVX]{1,4}|(?:di|de|del|della)))*",
                r",?[ ]+[0-9]{1,4}(?:[/ ]?[a-zA-Z])?(?-u:\b)",
                r"(?:,?[ ]*[0-9]{5}[ ]+\p{Lu}\p{Ll}+(?:[ ]\p{Lu}\p{Ll}+)?)?",
            )),
            // `〒100-0005 東京都千代田区丸の内1-1-1`, `大阪市北区梅田3丁目1-1`: a prefecture or a city
            // with its ward, then the block numbers.
            address_ja: re(concat!(
                r"(?:〒[ ]?[0-9０-９]{3}[-－]?[0-9０-９]{4}[ 　]?)?",
                r"(?:\p{Han}{1,4}[都道府県]\p{Han}{1,8}?[市区町村郡]|\p{Han}{1,5}市\p{Han}{1,4}区)",
                r"[\p{Han}\p{Hiragana}\p{Katakana}ー]{0,10}?",
                r"[0-9０-９]{1,4}(?:(?:丁目|条[東西南北]?|番地?|号|の|[-－−ー])?[0-9０-９]{1,4}){0,4}(?:丁目|番地?|号)?",
            )),
            address_fr: re(
                r"(?i)\b[0-9]{1,4}(?:[ ]?(?:bis|ter))?,?[ ]+(?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai|route)[ ]+(?:(?:de|du|des|la|le|l'|d')[ ]*){0,2}\p{Lu}[\p{L}'\-]+(?:[ ]+\p{Lu}[\p{L}'\-]+){0,3}",
            ),
            address_es: re(
                r"\b(?:Calle|C/|Avenida|Avda\.|Plaza|Paseo|Carrer|Rua)[ ]+(?:(?:de|del|la|las|los|da|do)[ ]+){0,2}\p{Lu}[\p{L}'\-]+(?:[ ]+\p{Lu}[\p{L}'\-]+){0,3},?[ ]*(?:n[º°o]\.?[ ]*)?[0-9]{1,4}\b",
            ),
            postcode_uk: re(
                r"\b(?:[A-PR-UWYZ][A-HK-Y]?[0-9][0-9A-HJKMNPR-Y]?)[ ][0-9][ABD-HJLNP-UW-Z]{2}\b",
            ),
            person: re(&format!(
                r"(?:(?i:\bmy name is|\bmy name's|\bi am called|\bname:|\bdear|\bje m'appelle|\bme llamo|\bmi nombre es|\bich heiße|\bich heisse|\bmein name ist|\bmi chiamo|\bmeu nome é|\bme chamo|\bmijn naam is|\bik heet|\bmeine name ist|меня зовут|\bbenim adım|με λένε|το όνομά μου είναι|ονομάζομαι|λέγομαι|nazywam się|mam na imię|jmenuji se)|\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Mx)\.?)[ ]+({NAME})"
            )),
            // Arabic has no capitals: the one or two words after "my name is".
            person_ar: re(
                r"(?:اسمي|إسمي|أنا اسمي|انا اسمي|معك)[ ]+((?:\p{Arabic}+)(?:[ ](?:عبد[ ])?\p{Arabic}+)?)",
            ),
            person_sig: re(&format!(
                r"(?i:\b(?:best regards|kind regards|warm regards|regards|sincerely|yours truly|yours sincerely|cheers|thanks|thank you|best|cordialement|saludos|atentamente|mit freundlichen grüßen|viele grüße|grüße|cordiali saluti)[,!.]?)[ \t]*\r?\n[ \t]*(?:--[ ]?)?({NAME})"
            )),
            person_weak: re(&format!(
                r"(?:(?i:\b(?:hi|hello|hey|this is|i'm|i am|call me|signed|thanks|cheers))[ ,]+)({NAME})\b"
            )),
            // A Korean name ends where its particle starts (`김민준입니다` → 김민준).
            person_cjk: re(concat!(
                r"(?:我叫|我的名字是|我的名字叫|私の名前は|わたしの名前は)[ ]?(\p{Han}{2,3}|\p{Katakana}{2,8})",
                r"|(?:제 이름은|내 이름은)[ ]?(\p{Hangul}{2,4}?)",
                r"(?:입니다|이에요|예요|이고|이며|이라고|라고|이야|야|씨|님|[이가은는을를]?(?:[ ,.!?]|$))",
            )),
            phone_regions,
        })
    }

    /// Every candidate span that passes its check (overlaps resolved by the caller).
    pub fn find(&self, t: &str, strict: bool, out: &mut dyn FnMut(Span)) {
        let mut push = |s: usize, e: usize, kind: Kind| {
            if s < e {
                out(Span {
                    start: s,
                    end: e,
                    kind,
                })
            }
        };
        let bytes = t.as_bytes();
        // Each pattern scans only texts that hold its required character (cheap byte tests
        // keep the common, clean message fast).
        if bytes.contains(&b'@') {
            for m in self.email.find_iter(t) {
                let local = &m.as_str()[..m.as_str().find('@').unwrap_or(0)];
                let next = t[m.end()..].chars().next();
                if !local.starts_with('.')
                    && !local.contains("..")
                    && !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    push(m.start(), m.end(), Kind::Email);
                }
            }
        }
        self.obfuscated_emails(t, &mut push);
        if bytes.contains(&b':') && bytes.contains(&b'/') {
            for m in self.url.find_iter(t) {
                let u = trim_url(m.as_str());
                if url_has_secret(u) {
                    push(m.start(), m.start() + u.len(), Kind::Url);
                }
            }
        }
        let digits = bytes.iter().any(u8::is_ascii_digit);
        if digits {
            self.numbers(t, strict, &mut push);
        }
        self.secrets(t, strict, &mut push);
        self.wallets(t, &mut push);
        self.addresses(t, digits, &mut push);
        self.people(t, strict, &mut push);
    }

    /// Addresses with `at`/`dot` spelled out or bracketed, or spaces around `@`: tried at
    /// every word, since a rejected candidate ("me at john dot smith") can hide the real one
    /// that starts inside it.
    fn obfuscated_emails(&self, t: &str, push: &mut dyn FnMut(usize, usize, Kind)) {
        let lower_has = |w: &str| {
            t.as_bytes()
                .windows(w.len())
                .any(|x| x.eq_ignore_ascii_case(w.as_bytes()))
        };
        if !(t.contains('@')
            || lower_has(" at ")
            || lower_has("at]")
            || lower_has("at)")
            || lower_has("at}")
            || lower_has("at>"))
        {
            return;
        }
        let mut at = 0;
        while at < t.len() {
            let Some(c) = self.email_obfuscated.captures_at(t, at) else {
                break;
            };
            let m = c.get(0).expect("group 0");
            let joint = c.get(1).map_or("", |g| g.as_str());
            if email_obfuscation_ok(t, m.start(), m.as_str(), joint) {
                push(m.start(), m.end(), Kind::Email);
                at = m.end();
            } else {
                // The next word.
                at = t[m.start()..]
                    .char_indices()
                    .skip(1)
                    .find(|&(_, ch)| !ch.is_alphanumeric())
                    .map_or(t.len(), |(i, _)| m.start() + i);
            }
        }
    }

    fn numbers(&self, t: &str, strict: bool, push: &mut dyn FnMut(usize, usize, Kind)) {
        // IBAN-shaped tokens that fail their check: no phone or id is looked for inside them.
        let mut shaped: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        while let Some(m) = self.iban.find_at(t, at) {
            match iban_len(m.as_str()) {
                Some(len) if standalone(t, m.start(), m.start() + len) => {
                    push(m.start(), m.start() + len, Kind::Iban);
                    at = m.start() + len;
                }
                _ => {
                    shaped.push((m.start(), m.end()));
                    // A failed candidate may hide a valid one that starts inside it.
                    at = m.start() + 1;
                    while !t.is_char_boundary(at) {
                        at += 1;
                    }
                }
            }
        }
        // The start of an IBAN whose rest comes later ("DE89 3704…" then, a line or a message
        // on, "0044 0532 0130 00"): both parts, when together they pass the check.
        if t.len() >= 15 {
            for m in self.iban_start.find_iter(t) {
                if iban_len(m.as_str()).is_some() {
                    continue;
                }
                if let Some((head, rest)) = iban_continued(t, m.start(), m.end()) {
                    push(m.start(), head, Kind::Iban);
                    push(rest.0, rest.1, Kind::Iban);
                    shaped.push((m.start(), head));
                    shaped.push(rest);
                }
            }
        }
        let inside_shaped = |s: usize, e: usize| shaped.iter().any(|&(a, b)| s < b && a < e);
        for m in self.card.find_iter(t) {
            if standalone(t, m.start(), m.end())
                && !inside_shaped(m.start(), m.end())
                && card_ok(m.as_str())
            {
                push(m.start(), m.end(), Kind::Card);
            }
        }
        for m in self.ipv4.find_iter(t) {
            if !standalone(t, m.start(), m.end()) {
                continue;
            }
            let before = &t[..m.start()];
            let after = &t[m.end()..];
            let ctx = context(t, m.start(), 24);
            // `1.2.3.4` (every part one digit) and dotted numbers after a version word are
            // versions; the public resolvers that look like this (1.1.1.1, 8.8.8.8) are not
            // personal data either.
            let version = before.ends_with(['.', 'v', 'V'])
                || after.starts_with('.') && after[1..].starts_with(|c: char| c.is_ascii_digit())
                || m.as_str().split('.').all(|o| o.len() == 1)
                // Loopback, "any" and broadcast addresses name no one.
                || m.as_str().starts_with("127.")
                || m.as_str() == "0.0.0.0"
                || m.as_str() == "255.255.255.255"
                || VERSION_CUES.iter().any(|c| ctx.contains(c));
            if !version {
                push(m.start(), m.end(), Kind::Ip);
            }
        }
        if t.contains(':') {
            for m in self.ipv6.find_iter(t) {
                let s = m.as_str();
                let hex = s.chars().filter(char::is_ascii_hexdigit).count();
                if s.matches(':').count() >= 2
                    && hex >= 6
                    && s.parse::<std::net::Ipv6Addr>().is_ok()
                    && standalone(t, m.start(), m.end())
                {
                    push(m.start(), m.end(), Kind::Ip);
                }
            }
        }
        for c in self.ssn.captures_iter(t) {
            let m = c.get(0).expect("group 0");
            if c.get(1).map(|g| g.as_str()) == c.get(2).map(|g| g.as_str())
                && standalone(t, m.start(), m.end())
                && ssn_ok(m.as_str())
            {
                push(m.start(), m.end(), Kind::Ssn);
            }
        }
        for m in self.ssn_plain.find_iter(t) {
            if !standalone(t, m.start(), m.end()) {
                continue;
            }
            let ctx = context(t, m.start(), 40);
            if (ctx.contains("ssn") || ctx.contains("social security")) && ssn_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::Ssn);
            }
        }
        for m in self.dni.find_iter(t) {
            if standalone(t, m.start(), m.end()) && dni_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        for m in self.nie.find_iter(t) {
            if standalone(t, m.start(), m.end()) && nie_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        for m in self.cpf.find_iter(t) {
            let formatted = m.as_str().contains('.') && m.as_str().contains('-');
            if (formatted || context(t, m.start(), 30).contains("cpf"))
                && standalone(t, m.start(), m.end())
                && cpf_ok(m.as_str())
            {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        for c in self.aadhaar.captures_iter(t) {
            let m = c.get(0).expect("group 0");
            let sep = c.get(1).map_or("", |g| g.as_str());
            let formatted = !sep.is_empty() && c.get(2).map(|g| g.as_str()) == Some(sep);
            let ctx = context(t, m.start(), 40);
            if (formatted
                || ctx.contains("aadhaar")
                || ctx.contains("aadhar")
                || ctx.contains("uid"))
                && !ctx.contains("order")
                && !inside_shaped(m.start(), m.end())
                && standalone(t, m.start(), m.end())
                && verhoeff_ok(m.as_str())
            {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        for m in self.nir.find_iter(t) {
            if standalone(t, m.start(), m.end()) && nir_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        self.phones(t, strict, &inside_shaped, push);
    }

    fn phones(
        &self,
        t: &str,
        strict: bool,
        excluded: &dyn Fn(usize, usize) -> bool,
        push: &mut dyn FnMut(usize, usize, Kind),
    ) {
        for m in self.phone.find_iter(t) {
            if excluded(m.start(), m.end()) {
                continue;
            }
            let s = m.as_str();
            let nd = s.bytes().filter(u8::is_ascii_digit).count();
            if !(7..=15).contains(&nd) || !standalone(t, m.start(), m.end()) {
                continue;
            }
            let before = t[..m.start()].trim_end();
            if before.ends_with(['$', '€', '£', '¥', '#', '№']) {
                continue;
            }
            // `1,234 567` or `3.141 592 65`: digit grouping, not the start of a number.
            let mut back = t[..m.start()].chars().rev();
            if matches!(back.next(), Some('.' | ','))
                && back.next().is_some_and(|c| c.is_ascii_digit())
            {
                continue;
            }
            let after = &t[m.end()..];
            if after.starts_with(['%', '€', '$']) {
                continue;
            }
            let ctx = context(t, m.start(), 30);
            if NOT_PHONE_CUES
                .iter()
                .any(|c| ctx.ends_with(c) || ctx.contains(&format!("{c} ")))
                && !PHONE_CUES.iter().any(|c| ctx.contains(c))
            {
                continue;
            }
            if looks_like_date_or_list(s) || isbn_ok(s) || thousands_grouped(s) {
                continue;
            }
            let international = s.starts_with('+') || s.starts_with("00");
            let formatted = s.contains([' ', '-', '(', '.', '/', '\n']) || s.contains(is_dash);
            let cued = PHONE_CUES.iter().any(|c| ctx.contains(c));
            // Validated on the digits alone: separators people type (en dashes, ` / `, line
            // breaks) mean nothing to the metadata, and a `(0)` after the country code is the
            // trunk prefix that international dialling drops.
            let valid = if international {
                let body = s.trim_start_matches('+').trim_start_matches("00");
                let body = match body.find("(0)") {
                    Some(i) if i <= 4 => format!("{}{}", &body[..i], &body[i + 3..]),
                    _ => body.to_string(),
                };
                let digits: String = body.chars().filter(char::is_ascii_digit).collect();
                phone_valid(None, &format!("+{digits}"))
            } else {
                let digits: String = s.chars().filter(char::is_ascii_digit).collect();
                (formatted || cued)
                    && self
                        .phone_regions
                        .iter()
                        .any(|&r| phone_valid(Some(r), &digits))
            };
            if valid || (strict && (cued || international || formatted && nd >= 9)) {
                push(m.start(), m.end(), Kind::Phone);
            }
        }
    }

    fn secrets(&self, t: &str, strict: bool, push: &mut dyn FnMut(usize, usize, Kind)) {
        for m in self.secret.find_iter(t) {
            push(m.start(), m.end(), Kind::Secret);
        }
        if t.contains("-----BEGIN") {
            for m in self.pem.find_iter(t) {
                push(m.start(), m.end(), Kind::Secret);
            }
        }
        let glued = |name: regex::Match<'_>, cue: regex::Match<'_>| {
            cue.start() > name.start() && !t[..cue.start()].ends_with(['_', '-', '.'])
        };
        for c in self.assign.captures_iter(t) {
            let (Some(name), Some(cue), Some(conn), Some(v)) =
                (c.get(1), c.get(2), c.get(3), c.get(4))
            else {
                continue;
            };
            if credential_ok(cue.as_str(), conn.as_str(), v.as_str(), glued(name, cue)) {
                push(v.start(), v.end(), Kind::Secret);
            }
        }
        for c in self.assign_loose.captures_iter(t) {
            let (Some(name), Some(cue), Some(v)) = (c.get(1), c.get(2), c.get(5)) else {
                continue;
            };
            if !glued(name, cue) && credential_loose_ok(v.as_str()) {
                push(v.start(), v.end(), Kind::Secret);
            }
        }
        if t.len() >= 40 {
            for c in self.aws_secret.captures_iter(t) {
                if let Some(v) = c.get(1) {
                    if cloud_key_like(v.as_str()) {
                        push(v.start(), v.end(), Kind::Secret);
                    }
                }
            }
        }
        for m in self.entropy.find_iter(t) {
            if standalone(t, m.start(), m.end()) && random_token(m.as_str()) {
                push(m.start(), m.end(), Kind::Secret);
            }
        }
        if strict {
            for m in self.hex.find_iter(t) {
                push(m.start(), m.end(), Kind::Secret);
            }
        }
    }

    fn wallets(&self, t: &str, push: &mut dyn FnMut(usize, usize, Kind)) {
        for m in self.btc.find_iter(t) {
            if standalone(t, m.start(), m.end()) && base58check_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::Crypto);
            }
        }
        for m in self.bech32.find_iter(t) {
            if standalone(t, m.start(), m.end()) && bech32_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::Crypto);
            }
        }
        for m in self.eth.find_iter(t) {
            if standalone(t, m.start(), m.end()) {
                push(m.start(), m.end(), Kind::Crypto);
            }
        }
    }

    fn addresses(&self, t: &str, digits: bool, push: &mut dyn FnMut(usize, usize, Kind)) {
        if digits {
            for re in [
                &self.address,
                &self.address_de,
                &self.address_fr,
                &self.address_es,
                &self.address_nl,
                &self.address_it,
                &self.address_ja,
            ] {
                for m in re.find_iter(t) {
                    push(m.start(), m.end(), Kind::Address);
                }
            }
            for c in self.dob.captures_iter(t) {
                if let Some(d) = c.get(1) {
                    push(d.start(), d.end(), Kind::DateOfBirth);
                }
            }
            for m in self.postcode_uk.find_iter(t) {
                push(m.start(), m.end(), Kind::Address);
            }
        }
        for m in self.codice.find_iter(t) {
            if codice_ok(m.as_str()) {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
        for m in self.nino.find_iter(t) {
            let p = &m.as_str()[..2];
            if !["BG", "GB", "NK", "KN", "TN", "NT", "ZZ"].contains(&p) {
                push(m.start(), m.end(), Kind::NationalId);
            }
        }
    }

    fn people(&self, t: &str, strict: bool, push: &mut dyn FnMut(usize, usize, Kind)) {
        let name = |m: regex::Match<'_>, push: &mut dyn FnMut(usize, usize, Kind)| {
            // Drop trailing words that are not names ("Dear John Thanks" → "John").
            let mut end = m.start();
            for (off, w) in words(m.as_str()) {
                if NOT_NAMES.contains(&w.trim_end_matches('.')) {
                    break;
                }
                end = m.start() + off + w.len();
            }
            push(m.start(), end, Kind::Person);
        };
        for c in self.person.captures_iter(t) {
            if let Some(m) = c.get(1) {
                name(m, push);
            }
        }
        if t.contains('\n') {
            for c in self.person_sig.captures_iter(t) {
                if let Some(m) = c.get(1) {
                    name(m, push);
                }
            }
        }
        for c in self.person_cjk.captures_iter(t) {
            if let Some(m) = c.get(1).or_else(|| c.get(2)) {
                // "제 이름은 나중에 …" (my name — later): words that are not names.
                if !["나중에", "비밀", "뭐", "없어", "없습니다", "중요"]
                    .iter()
                    .any(|w| m.as_str().starts_with(w))
                {
                    push(m.start(), m.end(), Kind::Person);
                }
            }
        }
        for c in self.person_ar.captures_iter(t) {
            if let Some(m) = c.get(1) {
                let first = m.as_str().split(' ').next().unwrap_or("");
                // "اسمي غير مهم" (my name is not important): negations and pronouns.
                if !["غير", "ليس", "لا", "ما", "هو", "هي", "مش"].contains(&first) {
                    push(m.start(), m.end(), Kind::Person);
                }
            }
        }
        for c in self.person_weak.captures_iter(t) {
            let Some(m) = c.get(1) else { continue };
            let cue = c.get(0).map_or("", |g| g.as_str()).to_lowercase();
            // Greetings take a name only when the name ends the greeting ("Hi Anna," /
            // "Hi Anna!"); "this is"/"I'm" only in strict mode (too often an adjective).
            let greeting = ["hi", "hello", "hey", "thanks", "cheers", "signed"]
                .iter()
                .any(|g| cue.starts_with(g));
            let closes = t[m.end()..].starts_with([',', '!', '\n', ':', '.']);
            if (greeting && closes) || strict {
                name(m, push);
            }
        }
    }
}

/// Word offsets (byte offset, word) split on single spaces.
fn words(s: &str) -> impl Iterator<Item = (usize, &str)> {
    s.split(' ').scan(0usize, |at, w| {
        let off = *at;
        *at += w.len() + 1;
        Some((off, w))
    })
}

/// At most `n` characters before `at`, lower-cased.
fn context(t: &str, at: usize, n: usize) -> String {
    let head = &t[..at];
    let start = head
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    head[start..].to_lowercase()
}

/// The match is not glued to letters or digits on either side.
fn standalone(t: &str, s: usize, e: usize) -> bool {
    let before = t[..s].chars().next_back();
    let after = t[e..].chars().next();
    !before.is_some_and(glues) && !after.is_some_and(glues)
}

/// Characters that make a number or token part of a longer word. Scripts written without
/// spaces (CJK, kana, Hangul, Thai, Lao, Khmer, Myanmar) do not: `電話は+81 90-…です`.
fn glues(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let u = c as u32;
    let unspaced = (0x0E00..=0x0EFF).contains(&u) // Thai, Lao
        || (0x1000..=0x109F).contains(&u) // Myanmar
        || (0x1780..=0x17FF).contains(&u) // Khmer
        || u >= 0x2E80; // CJK, kana, Hangul and everything after
    c.is_alphanumeric() && !unspaced
}

fn digits_of(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn luhn_ok(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn card_ok(s: &str) -> bool {
    // One kind of separator throughout (` `, `-`, `.`, ` - `), except that a line break may
    // stand in for any of them (the number wrapped), between groups of at least four digits.
    let mut seps: Vec<String> = Vec::new();
    let mut groups: Vec<usize> = vec![0];
    let mut cur = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !cur.is_empty() {
                seps.push(std::mem::take(&mut cur));
                groups.push(0);
            }
            *groups.last_mut().expect("one") += 1;
        } else {
            cur.push(c);
        }
    }
    let kinds: Vec<&str> = seps
        .iter()
        .filter(|x| !x.contains('\n'))
        .map(|x| if x.trim().is_empty() { " " } else { x.trim() })
        .collect();
    if kinds.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    for (i, sep) in seps.iter().enumerate() {
        if sep.contains('\n') && (groups[i] < 4 || groups[i + 1] < 4) {
            return false;
        }
    }
    let d = digits_of(s);
    if !(13..=19).contains(&d.len()) || d.iter().all(|&x| x == d[0]) || !luhn_ok(&d) {
        return false;
    }
    let p = |n: usize| d[..n].iter().fold(0u32, |a, &x| a * 10 + x);
    let n = d.len();
    // Issuer prefix and the lengths that issuer uses.
    match d[0] {
        // 13-digit Visa numbers are no longer issued; 13 digits starting with 4 are EAN-13
        // barcodes far more often.
        4 => matches!(n, 16 | 19),
        5 => (51..=55).contains(&p(2)) && n == 16,
        2 => (2221..=2720).contains(&p(4)) && n == 16,
        3 => match p(2) {
            34 | 37 => n == 15,
            35 => n >= 16,
            30 | 36 | 38 | 39 => n >= 14,
            _ => false,
        },
        6 => (p(4) == 6011 || p(2) == 65 || (644..=649).contains(&p(3)) || p(2) == 62) && n >= 16,
        _ => false,
    }
}

/// IBAN length by country.
const IBAN_LEN: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SC", 31),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
];

/// The byte length of a valid IBAN at the start of `s` (its country's length of letters and
/// digits, separators included), when there is one.
fn iban_len(s: &str) -> Option<usize> {
    let cc = s.get(..2)?.to_ascii_uppercase();
    let want = IBAN_LEN.iter().find(|(c, _)| *c == cc)?.1;
    let mut compact = String::with_capacity(want);
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if c.is_ascii_alphanumeric() {
            compact.push(c.to_ascii_uppercase());
            end = i + 1;
            if compact.len() == want {
                break;
            }
        }
    }
    if compact.len() != want {
        return None;
    }
    // A letter glued to the end means this was part of a longer token.
    let rearranged = format!("{}{}", &compact[4..], &compact[..4]);
    let mut rem: u32 = 0;
    for c in rearranged.chars() {
        let v = c.to_digit(36)?;
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(end)
}

/// An IBAN cut in two: the candidate at `start..end` is its beginning (a country with a
/// known length, fewer characters than that), and its rest is the first run of digit groups
/// within 40 characters after it (skipping punctuation, a line break, a role prefix, a word
/// such as "sorry:"). Returns the end of the beginning and the rest's span when the two
/// together have the country's length and pass mod-97.
fn iban_continued(t: &str, start: usize, end: usize) -> Option<(usize, (usize, usize))> {
    let head = &t[start..end];
    let cc = head.get(..2)?.to_ascii_uppercase();
    let want = IBAN_LEN.iter().find(|(c, _)| *c == cc)?.1;
    // The beginning: whole groups of the candidate (a last group glued to a word is not).
    let mut compact = String::new();
    let mut head_end = start;
    for (i, c) in head.char_indices() {
        if c.is_ascii_alphanumeric() {
            compact.push(c.to_ascii_uppercase());
            head_end = start + i + 1;
        }
    }
    if compact.len() >= want || compact.len() < 6 {
        return None;
    }
    // Skip to the first digit within 40 characters.
    let after = &t[end..];
    let skip = after
        .char_indices()
        .take_while(|&(i, _)| i <= 40)
        .find(|(_, c)| c.is_ascii_digit())?
        .0;
    // What is skipped holds no digit-bearing token of its own and no second IBAN start.
    let rest_start = end + skip;
    let mut rest_end = rest_start;
    let mut full = compact.clone();
    let mut last_sep = false;
    for (i, c) in t[rest_start..].char_indices() {
        if full.len() == want {
            break;
        }
        if c.is_ascii_alphanumeric() {
            full.push(c.to_ascii_uppercase());
            rest_end = rest_start + i + 1;
            last_sep = false;
        } else if (c == ' ' || c == '-' || c == '\n') && !last_sep {
            last_sep = true;
        } else {
            break;
        }
    }
    if full.len() != want {
        return None;
    }
    // The rest ends at a group boundary, not inside a longer token.
    if t[rest_end..]
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    iban_len(&full).map(|_| (head_end, (rest_start, rest_end)))
}

fn ssn_ok(s: &str) -> bool {
    let d = digits_of(s);
    if d.len() != 9 {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    let n: String = d
        .iter()
        .map(|x| char::from_digit(*x, 10).unwrap_or('0'))
        .collect();
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !["078051120", "219099999", "123456789"].contains(&n.as_str())
}

const DNI_LETTERS: &[u8] = b"TRWAGMYFPDXBNJZSQVHLCKE";

fn dni_ok(s: &str) -> bool {
    let d = digits_of(s);
    let letter = s.chars().last().unwrap_or(' ');
    let n = d.iter().fold(0u64, |a, &x| a * 10 + u64::from(x));
    d.len() == 8 && DNI_LETTERS[(n % 23) as usize] as char == letter
}

fn nie_ok(s: &str) -> bool {
    let first = match s.chars().next() {
        Some('X') => 0,
        Some('Y') => 1,
        Some('Z') => 2,
        _ => return false,
    };
    let d = digits_of(s);
    let letter = s.chars().last().unwrap_or(' ');
    let n = d.iter().fold(first, |a, &x| a * 10 + u64::from(x));
    d.len() == 7 && DNI_LETTERS[(n % 23) as usize] as char == letter
}

fn cpf_ok(s: &str) -> bool {
    let d = digits_of(s);
    if d.len() != 11 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let sum: u32 = (0..n).map(|i| d[i] * (n as u32 + 1 - i as u32)).sum();
        let r = (sum * 10) % 11;
        if r == 10 {
            0
        } else {
            r
        }
    };
    check(9) == d[9] && check(10) == d[10]
}

fn verhoeff_ok(s: &str) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    let d = digits_of(s);
    if d.len() != 12 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let mut c = 0u8;
    for (i, &x) in d.iter().rev().enumerate() {
        c = D[c as usize][P[i % 8][x as usize] as usize];
    }
    c == 0
}

/// French social security number: the key is 97 − (the first 13 digits mod 97); Corsica's
/// 2A/2B count as 19/18.
fn nir_ok(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.len() != 15 {
        return false;
    }
    let body = compact[..13].replace("2A", "19").replace("2B", "18");
    let (Ok(n), Ok(key)) = (body.parse::<u64>(), compact[13..].parse::<u64>()) else {
        return false;
    };
    key == 97 - n % 97
}

/// Italian codice fiscale: the last letter checks the first fifteen characters.
fn codice_ok(s: &str) -> bool {
    const ODD: [u32; 36] = [
        1, 0, 5, 7, 9, 13, 15, 17, 19, 21, // 0-9
        1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24,
        23, // A-Z
    ];
    let up: Vec<char> = s.chars().map(|c| c.to_ascii_uppercase()).collect();
    if up.len() != 16 {
        return false;
    }
    let val = |c: char| -> Option<usize> {
        if c.is_ascii_digit() {
            Some(c as usize - '0' as usize)
        } else if c.is_ascii_uppercase() {
            Some(c as usize - 'A' as usize + 10)
        } else {
            None
        }
    };
    let mut sum = 0;
    for (i, &c) in up[..15].iter().enumerate() {
        let Some(v) = val(c) else { return false };
        sum += if i % 2 == 0 {
            ODD[v]
        } else if v < 10 {
            v as u32
        } else {
            (v - 10) as u32
        };
    }
    up[15] == (b'A' + (sum % 26) as u8) as char
}

fn isbn_ok(s: &str) -> bool {
    let d = digits_of(s);
    match d.len() {
        13 if d[..3] == [9, 7, 8] || d[..3] == [9, 7, 9] => {
            let sum: u32 = d
                .iter()
                .enumerate()
                .map(|(i, &x)| if i % 2 == 0 { x } else { 3 * x })
                .sum();
            sum.is_multiple_of(10)
        }
        _ => false,
    }
}

/// `2024-01-15`, `15/01/2024`, `12.03.2025 14:30`, `2019 2020 2021`, `1.2.3.4`: not phones.
fn looks_like_date_or_list(s: &str) -> bool {
    let groups: Vec<&str> = s
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .collect();
    let year = |g: &str| g.len() == 4 && (g.starts_with("19") || g.starts_with("20"));
    if groups.len() == 3
        && (year(groups[0]) || year(groups[2]))
        && groups.iter().all(|g| g.len() <= 4)
    {
        return true;
    }
    if groups.len() >= 2 && groups.iter().all(|g| year(g)) {
        return true;
    }
    // `2024-000123`: a year, then a running number (invoices, tickets, file numbers).
    if groups.len() == 2 && year(groups[0]) && groups[1].len() >= 5 && !s.starts_with(['+', '(']) {
        return true;
    }
    // Dotted short groups are versions or decimals (phones with dots have groups of 3-4),
    // except the French way of writing a number: five pairs from a leading 0.
    let french = groups.len() == 5 && groups.iter().all(|g| g.len() == 2) && s.starts_with('0');
    s.contains('.') && !french && groups.iter().filter(|g| g.len() <= 2).count() >= 2
}

/// Words that follow a password's name without being one ("the password is wrong",
/// "Passwort ist falsch", "mot de passe : obligatoire").
const NOT_SECRETS: &[&str] = &[
    "true",
    "false",
    "null",
    "none",
    "nil",
    "required",
    "incorrect",
    "wrong",
    "correct",
    "invalid",
    "expired",
    "reset",
    "empty",
    "missing",
    "must",
    "should",
    "will",
    "can",
    "cannot",
    "the",
    "your",
    "not",
    "too",
    "very",
    "set",
    "changed",
    "here",
    "below",
    "above",
    "same",
    "different",
    "strong",
    "weak",
    "secure",
    "unsafe",
    "safe",
    "optional",
    "hidden",
    "falsch",
    "richtig",
    "ungültig",
    "abgelaufen",
    "vergessen",
    "erforderlich",
    "nicht",
    "obligatoire",
    "oublié",
    "trop",
    "faux",
    "incorrecto",
    "incorrecta",
    "obligatoria",
    "obligatorio",
    "olvidada",
    "errata",
    "sbagliata",
    "scaduta",
    "obbligatoria",
    "verkeerd",
    "verlopen",
    "vergeten",
    "verplicht",
    "неверный",
    "неправильный",
    "forgotten",
    "updated",
    "protected",
    "encrypted",
    "hashed",
    "stored",
    "needed",
    "also",
    "still",
    "only",
    "just",
];

/// A value after a credential's name (`cue`, joined by `conn`) that is a credential: not a
/// word of the sentence, not a placeholder or template (`<EMAIL_1>`, `${DB_PASS}`,
/// `****`), and — where the sentence is prose ("the password is …") or the name is weak
/// (`pass`, `pin`, `token`) or glued to a prefix (`PGPASSWORD`) — shaped like a secret.
fn credential_ok(cue: &str, conn: &str, value: &str, glued: bool) -> bool {
    let v = value.trim_end_matches(['.', '!', '?', ')', ']']);
    if !plausible_value(v) {
        return false;
    }
    let cue = cue.to_lowercase();
    let conn = conn.trim();
    let syntactic = [":", "=", "："].contains(&conn);
    let shaped = v.chars().any(|c| c.is_ascii_digit())
        || v.chars().any(|c| c.is_ascii_punctuation())
        || v.chars().skip(1).any(|c| c.is_ascii_uppercase());
    let weak = [
        "pass", "pw", "pin", "clave", "parola", "token", "secret", "bearer", "암호",
    ]
    .contains(&cue.as_str());
    if glued {
        return conn == "=" && !weak && v.len() >= 4;
    }
    if syntactic && !weak {
        return true;
    }
    if ["は", "是", "为", "為", "은", "는"].contains(&conn) {
        return shaped || v.len() >= 6;
    }
    shaped && v.len() >= 4
}

/// A value after words between it and a credential's name, or right after the name with no
/// connector: taken only when it looks like a password — letters with digits or symbols, six
/// characters or more — which a word of prose does not.
fn credential_loose_ok(value: &str) -> bool {
    let v = value.trim_end_matches(['.', '!', '?', ')', ']']);
    plausible_value(v)
        && v.len() >= 6
        && v.chars().any(|c| c.is_alphabetic())
        && (v.chars().any(|c| c.is_ascii_digit()) || v.chars().any(|c| c.is_ascii_punctuation()))
}

/// Not a word of the sentence, a placeholder or a template (`<EMAIL_1>`, `${DB_PASS}`,
/// `****`), or a link.
fn plausible_value(v: &str) -> bool {
    v.chars().count() >= 3
        && !v.starts_with(['<', '$', '{', '%', '*', '#', '('])
        && !v.chars().all(|c| c == v.chars().next().unwrap_or(' '))
        && !NOT_SECRETS.contains(&v.to_lowercase().as_str())
        && !v.contains("://")
}

/// A cloud secret key's shape (AWS's 40-character secret access key): base64 letters with a
/// `/` or `+`, both cases and a digit, and no piece that reads as a path (`src/main/java`).
fn cloud_key_like(s: &str) -> bool {
    let (mut up, mut low, mut dig) = (0, 0, 0);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' => up += 1,
            b'a'..=b'z' => low += 1,
            b'0'..=b'9' => dig += 1,
            _ => {}
        }
    }
    let seps = s.bytes().filter(|b| *b == b'/' || *b == b'+').count();
    up >= 2
        && low >= 2
        && dig >= 1
        && (1..=4).contains(&seps)
        && !s.contains("//")
        && s.split(['/', '+']).all(|seg| {
            seg.len() <= 3
                || seg
                    .chars()
                    .any(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                    && seg
                        .chars()
                        .any(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// `1.234.567` or `12,345,678`: a quantity with thousands separators, not a phone number.
fn thousands_grouped(s: &str) -> bool {
    let sep = if s.contains('.') { '.' } else { ',' };
    let mut parts = s.split(sep);
    let first = parts.next().unwrap_or("");
    let rest: Vec<&str> = parts.collect();
    !rest.is_empty()
        && (1..=3).contains(&first.len())
        && first.bytes().all(|b| b.is_ascii_digit())
        && rest
            .iter()
            .all(|p| p.len() == 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_dash(c: char) -> bool {
    ('\u{2010}'..='\u{2014}').contains(&c)
}

const COMMON_TLDS: &[&str] = &[
    "com", "org", "net", "edu", "gov", "io", "me", "info", "biz", "co", "ai", "app", "dev", "eu",
    "de", "fr", "uk", "jp", "es", "it", "nl", "ru", "cn", "br", "in", "au", "ca", "ch", "at", "be",
    "se", "no", "dk", "fi", "pl", "pt", "cz", "gr", "tr", "mx", "ar", "kr", "tw", "hk", "sg", "nz",
    "ie", "il", "za", "ua", "ro", "hu", "sk", "us",
];

const MAIL_PROVIDERS: &[&str] = &[
    "gmail",
    "googlemail",
    "yahoo",
    "outlook",
    "hotmail",
    "live",
    "msn",
    "icloud",
    "me",
    "aol",
    "proton",
    "protonmail",
    "gmx",
    "web",
    "mail",
    "yandex",
    "qq",
    "163",
    "126",
    "naver",
    "orange",
    "free",
    "laposte",
    "libero",
    "t-online",
    "zoho",
    "fastmail",
    "tutanota",
];

const EMAIL_CUES: &[&str] = &[
    "mail",
    "contact",
    "reach",
    "write",
    "send",
    "écri",
    "escrib",
    "schreib",
    "adresse",
    "address",
    "correo",
    "courriel",
    "indirizzo",
    "メール",
    "邮箱",
    "메일",
    "почт",
];

/// An obfuscated address (`joint` is what stands for `@`): its top-level domain is a real
/// one, and a spelled-out `at` is taken only where an address is plausible — after a mail
/// cue, at a known provider, or with a dotted or numbered local part — since "look at this
/// dot com" is English, not an address.
fn email_obfuscation_ok(t: &str, start: usize, m: &str, joint: &str) -> bool {
    let lower = m.to_lowercase();
    let norm: String = lower
        .replace(|c: char| "[](){}<>".contains(c), " ")
        .split_whitespace()
        .map(|w| match w {
            "dot" => ".",
            "at" => "@",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("");
    let Some((local, domain)) = norm.split_once('@') else {
        return false;
    };
    let labels: Vec<&str> = domain.split('.').collect();
    let tld = labels.last().copied().unwrap_or("");
    if local.is_empty() || labels.len() < 2 || !(2..=24).contains(&tld.chars().count()) {
        return false;
    }
    if !tld.chars().all(char::is_alphabetic) {
        return false;
    }
    let joint = joint.trim();
    if joint.contains('@') || joint.starts_with(['[', '(', '{', '<']) {
        return true;
    }
    // Spelled-out `at`; a template ("name at company dot com") names no one.
    let sld = labels[labels.len() - 2];
    if [
        "name",
        "user",
        "username",
        "yourname",
        "you",
        "firstname.lastname",
        "first.last",
    ]
    .contains(&local)
        && [
            "company",
            "domain",
            "example",
            "yourcompany",
            "mydomain",
            "email",
            "mail",
        ]
        .contains(&sld)
    {
        return false;
    }
    COMMON_TLDS.contains(&tld)
        && (MAIL_PROVIDERS.contains(&sld)
            || local.contains(['.', '_'])
            || local.chars().any(|c| c.is_ascii_digit())
            || EMAIL_CUES.iter().any(|c| context(t, start, 40).contains(c)))
}

fn phone_valid(region: Option<phonenumber::country::Id>, s: &str) -> bool {
    // The crate's parser has internal unwraps; a candidate is only digits and separators,
    // but a panic here would cost the row, so it is caught.
    crate::error::no_panic(|| {
        phonenumber::parse(region, s)
            .map(|n| phonenumber::is_valid(&n))
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

fn trim_url(u: &str) -> &str {
    u.trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '}', '\'', '"'])
}

/// A URL with a password in its user part, or a credential in its query or fragment.
fn url_has_secret(u: &str) -> bool {
    let rest = u.split_once("://").map_or(u, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((user, _)) = authority.rsplit_once('@') {
        if user.contains(':') || !user.is_empty() {
            return true;
        }
    }
    let query = rest.split_once(['?', '#']).map_or("", |(_, q)| q);
    query.split(['&', ';', '#']).any(|kv| {
        let k = kv.split('=').next().unwrap_or("").to_ascii_lowercase();
        kv.contains('=')
            && (crate::llm::redact::is_secret_param(&k)
                || [
                    "access_token",
                    "id_token",
                    "refresh_token",
                    "session",
                    "sessionid",
                    "session_id",
                    "sid",
                    "auth",
                    "password",
                    "pwd",
                    "passwd",
                    "x-amz-signature",
                    "x-amz-credential",
                    "x-amz-security-token",
                    "x-goog-signature",
                    "x-goog-credential",
                    "jwt",
                    "otp",
                    "reset_token",
                    "invite",
                ]
                .contains(&k.as_str()))
    })
}

/// A token that looks machine-made: long, letters of both cases and digits, and close to
/// uniformly random (Shannon entropy per character).
fn random_token(s: &str) -> bool {
    let s = s.trim_end_matches('=');
    if s.len() < 24 {
        return false;
    }
    let (mut up, mut low, mut dig) = (0, 0, 0);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' => up += 1,
            b'a'..=b'z' => low += 1,
            b'0'..=b'9' => dig += 1,
            _ => {}
        }
    }
    if up < 2 || low < 2 || dig < 2 {
        return false;
    }
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    // A random base62 string of length n has entropy close to min(log2 n, 5.95).
    h >= (n.log2() - 0.9).min(4.3)
}

fn base58check_ok(s: &str) -> bool {
    const ALPHA: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut bytes: Vec<u8> = vec![0; 25];
    for c in s.bytes() {
        let Some(v) = ALPHA.iter().position(|&a| a == c) else {
            return false;
        };
        let mut carry = v as u32;
        for b in bytes.iter_mut().rev() {
            carry += u32::from(*b) * 58;
            *b = (carry & 0xff) as u8;
            carry >>= 8;
        }
        if carry != 0 {
            return false;
        }
    }
    use sha2::Digest;
    let h1 = sha2::Sha256::digest(&bytes[..21]);
    let h2 = sha2::Sha256::digest(h1);
    h2[..4] == bytes[21..]
}

fn bech32_ok(s: &str) -> bool {
    const CHARSET: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    let lower = s.to_ascii_lowercase();
    if lower != s && s.to_ascii_uppercase() != s {
        return false;
    }
    let Some(pos) = lower.rfind('1') else {
        return false;
    };
    let (hrp, data) = (&lower[..pos], &lower[pos + 1..]);
    let mut values = Vec::with_capacity(hrp.len() * 2 + 1 + data.len());
    values.extend(hrp.bytes().map(|b| u32::from(b >> 5)));
    values.push(0);
    values.extend(hrp.bytes().map(|b| u32::from(b & 31)));
    for c in data.bytes() {
        let Some(v) = CHARSET.iter().position(|&a| a == c) else {
            return false;
        };
        values.push(v as u32);
    }
    const GEN: [u32; 5] = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];
    let mut chk: u32 = 1;
    for v in values {
        let b = chk >> 25;
        chk = ((chk & 0x1ffffff) << 5) ^ v;
        for (i, g) in GEN.iter().enumerate() {
            if (b >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk == 1 || chk == 0x2bc830a3
}

#[cfg(test)]
mod tests {
    use super::super::{Level, Redactor, Rules};

    fn red(t: &str) -> String {
        Redactor::new(Level::Standard, &Rules::default())
            .unwrap()
            .redact(t)
            .text
    }

    #[test]
    fn each_kind_is_found() {
        for (text, want) in [
            (
                "mail me at jane.doe+x@mail.example.co.uk please",
                "<EMAIL_1>",
            ),
            ("call +1 (415) 555-2671 tomorrow", "<PHONE_1>"),
            ("my number is 020 7946 0958", "<PHONE_1>"),
            ("Handy: +49 30 901820", "<PHONE_1>"),
            ("card 4111 1111 1111 1111 exp 12/27", "<CARD_1>"),
            ("pay to DE89 3704 0044 0532 0130 00 today", "<IBAN_1>"),
            ("GB82WEST12345698765432", "<IBAN_1>"),
            ("server 192.168.10.42 is down", "<IP_1>"),
            ("from 2001:db8:85a3::8a2e:370:7334 again", "<IP_1>"),
            ("see https://user:hunter2@db.example.com/x", "<URL_1>"),
            ("https://x.io/reset?token=abcDEF123456 ok", "<URL_1>"),
            ("SSN 536-90-4387.", "<SSN_1>"),
            ("DNI 12345678Z", "<NATIONAL_ID_1>"),
            ("CPF 529.982.247-25", "<NATIONAL_ID_1>"),
            ("NINO AB 12 34 56 C", "<NATIONAL_ID_1>"),
            (
                "key sk-proj-abcdefghijklmnopqrstuvwxyz0123 leaked",
                "<SECRET_1>",
            ),
            ("AKIAIOSFODNN7EXAMPLE", "<SECRET_1>"),
            ("ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "<SECRET_1>"),
            ("password: hunter2!", "<SECRET_1>"),
            ("send to 1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "<CRYPTO_1>"),
            ("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq", "<CRYPTO_1>"),
            ("0x52908400098527886E0F7030069857D2E4169EE7", "<CRYPTO_1>"),
            (
                "I live at 742 Evergreen Terrace, Springfield",
                "<ADDRESS_1>",
            ),
            ("Ich wohne in der Hauptstraße 5", "<ADDRESS_1>"),
            ("Hi, my name is Maria Gonzalez and", "<PERSON_1>"),
            ("Dear John,\nthanks", "<PERSON_1>"),
            ("Best regards,\nAnna Schmidt", "<PERSON_1>"),
            ("我叫王小明，想问一下", "<PERSON_1>"),
            ("меня зовут Иван Петров", "<PERSON_1>"),
        ] {
            let out = red(text);
            assert!(out.contains(want), "{text:?} → {out:?}");
        }
    }

    #[test]
    fn near_misses_stay() {
        for text in [
            "Order #123456789 shipped on 2024-03-15",
            "Invoice 2024-000123 total $1,234.56",
            "Upgrade to version 1.2.3.4 or 10.0.19045",
            "ISBN 978-3-16-148410-0 is the book",
            "The meeting is 15/01/2024 at 14:30",
            "git commit 3f2a9c1 fixed it",
            "It costs 1299.99 EUR or 1 234 567 yen",
            "Dear Sir or Madam,",
            "Hi there, how do I sort a list?",
            "Tracking number 1Z999AA10123456784",
            "the years 2019 2020 2021 were hard",
            "call me later",
            "I have 3 cats and 12 dogs",
            "use std::collections::HashMap;",
            "ratio 16:9 at 12:30:45",
        ] {
            assert_eq!(red(text), text, "{text:?} was changed");
        }
    }

    #[test]
    fn checks_refuse_wrong_check_digits() {
        assert_eq!(red("card 4111 1111 1111 1112"), "card 4111 1111 1111 1112");
        assert_eq!(
            red("DE89 3704 0044 0532 0130 01"),
            "DE89 3704 0044 0532 0130 01"
        );
        assert_eq!(red("DNI 12345678A"), "DNI 12345678A");
        assert_eq!(red("CPF 529.982.247-26"), "CPF 529.982.247-26");
        assert_eq!(red("SSN 000-12-3456"), "SSN 000-12-3456");
    }
}
