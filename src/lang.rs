//! Language awareness: which language a row is written in (whatlang's trigram and script
//! detector, on a bounded prefix of the user's words), and whether an encoder covers it.
//!
//! An English-only encoder does not fail on Chinese or Arabic; it places such text almost at
//! random, so its vote there is confidently wrong. A row in a language the index's encoder was
//! not trained on is therefore escalated (`escalate_reason = "language"`) instead of guessed.
//! The coverage comes from the model card (`model::Languages`), never from a list here.
//!
//! This module must never embed, read files or decide labels.

use crate::conversation::{Content, Role};
use crate::model::Languages;

/// Characters of a row looked at: trigram detection is stable well before this, and a 5 MB
/// message must cost no more than a short one.
const SAMPLE_CHARS: usize = 600;

/// A row's detected language.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detected {
    /// ISO 639-1 where the language has one (`en`, `zh`, `ar`…), else ISO 639-3.
    pub code: &'static str,
    /// whatlang's own reliability verdict (enough text, a clear winner).
    pub reliable: bool,
    /// Written in Latin script.
    pub latin: bool,
}

/// The user's words of a conversation (all text for a plain row), bounded to [`SAMPLE_CHARS`].
fn sample(content: &Content) -> String {
    let mut s = String::new();
    let mut n = 0usize;
    let mut push = |t: &str| {
        for c in t.chars() {
            if n >= SAMPLE_CHARS {
                return;
            }
            s.push(c);
            n += 1;
        }
        s.push(' ');
    };
    match content {
        Content::Text(t) => push(bounded(t)),
        Content::Turns(turns) => {
            let users: Vec<&str> = turns
                .iter()
                .filter(|t| t.role == Role::User)
                .map(|t| t.content.as_str())
                .collect();
            // A dialogue without user turns: whatever it has.
            let any: Vec<&str> = if users.is_empty() {
                turns.iter().map(|t| t.content.as_str()).collect()
            } else {
                users
            };
            for t in any {
                push(bounded(t));
            }
        }
    }
    s
}

/// The first few kilobytes of `t`, cut on a character boundary.
fn bounded(t: &str) -> &str {
    let mut end = t.len().min(SAMPLE_CHARS * 4);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// Detects the language of a conversation; `None` when there is no text to judge (emoji,
/// digits, punctuation only).
pub fn detect(content: &Content) -> Option<Detected> {
    let text = sample(content);
    let info = whatlang::detect(&text)?;
    let lang = info.lang();
    Some(Detected {
        code: iso639_1(lang.code()),
        reliable: info.is_reliable(),
        latin: info.script() == whatlang::Script::Latin,
    })
}

/// Whether an encoder trained on `languages` should not be trusted with this row: a reliably
/// detected language it does not list, or (when detection is unsure) a script none of its
/// languages is written in. Unknown or multilingual coverage trusts every row.
pub fn outside(languages: &Languages, d: &Detected) -> bool {
    let Languages::Only(list) = languages else {
        return false;
    };
    if list.iter().any(|l| l == d.code) {
        return false;
    }
    if d.reliable {
        return true;
    }
    // Unsure which language, but sure of the script: Latin text is within reach of a
    // Latin-script encoder's word pieces, other scripts are not.
    !d.latin && list.iter().all(|l| is_latin_language(l))
}

fn is_latin_language(code: &str) -> bool {
    whatlang::Script::Latin
        .langs()
        .iter()
        .any(|l| iso639_1(l.code()) == code)
}

/// ISO 639-3 (whatlang) to ISO 639-1 (model cards), for the languages whatlang knows.
fn iso639_1(code3: &'static str) -> &'static str {
    const MAP: &[(&str, &str)] = &[
        ("afr", "af"),
        ("aka", "ak"),
        ("amh", "am"),
        ("ara", "ar"),
        ("aze", "az"),
        ("bel", "be"),
        ("ben", "bn"),
        ("bul", "bg"),
        ("cat", "ca"),
        ("ces", "cs"),
        ("cmn", "zh"),
        ("cym", "cy"),
        ("dan", "da"),
        ("deu", "de"),
        ("ell", "el"),
        ("eng", "en"),
        ("epo", "eo"),
        ("est", "et"),
        ("fin", "fi"),
        ("fra", "fr"),
        ("guj", "gu"),
        ("heb", "he"),
        ("hin", "hi"),
        ("hrv", "hr"),
        ("hun", "hu"),
        ("hye", "hy"),
        ("ind", "id"),
        ("ita", "it"),
        ("jav", "jv"),
        ("jpn", "ja"),
        ("kan", "kn"),
        ("kat", "ka"),
        ("khm", "km"),
        ("kor", "ko"),
        ("lat", "la"),
        ("lav", "lv"),
        ("lit", "lt"),
        ("mal", "ml"),
        ("mar", "mr"),
        ("mkd", "mk"),
        ("mya", "my"),
        ("nep", "ne"),
        ("nld", "nl"),
        ("nob", "nb"),
        ("ori", "or"),
        ("pan", "pa"),
        ("pes", "fa"),
        ("pol", "pl"),
        ("por", "pt"),
        ("ron", "ro"),
        ("rus", "ru"),
        ("sin", "si"),
        ("slk", "sk"),
        ("slv", "sl"),
        ("sna", "sn"),
        ("spa", "es"),
        ("srp", "sr"),
        ("swe", "sv"),
        ("tam", "ta"),
        ("tel", "te"),
        ("tgl", "tl"),
        ("tha", "th"),
        ("tuk", "tk"),
        ("tur", "tr"),
        ("ukr", "uk"),
        ("urd", "ur"),
        ("uzb", "uz"),
        ("vie", "vi"),
        ("yid", "yi"),
        ("zul", "zu"),
    ];
    MAP.iter()
        .find(|(three, _)| *three == code3)
        .map_or(code3, |(_, one)| one)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Turn;

    fn text(t: &str) -> Content {
        Content::Text(t.into())
    }

    #[test]
    fn detects_scripts_and_languages() {
        let d = detect(&text(
            "Where is my refund? I returned the shoes two weeks ago.",
        ))
        .unwrap();
        assert_eq!(d.code, "en");
        assert!(d.latin);
        let d = detect(&text(
            "我上周买的耳机坏了，请问怎么申请退款？订单号在邮件里。",
        ))
        .unwrap();
        assert_eq!(d.code, "zh");
        assert!(!d.latin);
        let d = detect(&text("Наушники, купленные на прошлой неделе, сломались.")).unwrap();
        assert_eq!(d.code, "ru");
        assert!(detect(&text("🔥🔥 123 !!!")).is_none());
    }

    #[test]
    fn english_only_encoders_refuse_other_languages() {
        let en = Languages::Only(vec!["en".into()]);
        let zh = detect(&text("我忘记了密码，验证码一直收不到，账号登录不上去。")).unwrap();
        assert!(outside(&en, &zh));
        assert!(!outside(&Languages::Multilingual, &zh));
        assert!(!outside(&Languages::Unknown, &zh));
        let en_row = detect(&text("I forgot my password and the code never arrives")).unwrap();
        assert!(!outside(&en, &en_row));
        // Too short to know the language, but plainly not Latin script.
        let short = Detected {
            code: "ar",
            reliable: false,
            latin: false,
        };
        assert!(outside(&en, &short));
        let short_latin = Detected {
            code: "es",
            reliable: false,
            latin: true,
        };
        assert!(!outside(&en, &short_latin));
    }

    #[test]
    fn dialogues_are_judged_on_user_turns_and_giant_text_is_bounded() {
        let c = Content::Turns(vec![
            Turn {
                role: Role::System,
                content: "You are a helpful assistant. Answer in the user's language.".into(),
            },
            Turn {
                role: Role::User,
                content: "Хочу сегодня приготовить борщ, какие нужны продукты?".into(),
            },
        ]);
        assert_eq!(detect(&c).unwrap().code, "ru");
        let giant = "ж".repeat(5_000_000);
        assert_eq!(detect(&text(&giant)).unwrap().code, "ru");
        assert!(sample(&text(&giant)).chars().count() <= SAMPLE_CHARS + 1);
    }
}
