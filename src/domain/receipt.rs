//! Delivery receipts and mobile-originated keywords: what a provider reports about a message it
//! took, how its ids are compared, and which texts opt a number out or back in.

/// What a receipt says became of a message (or of one of its parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// The handset has it.
    Delivered,
    /// It will not arrive: the receipt's state and error, as the message's `error`
    /// (`undelivered: UNDELIV err 001`).
    Failed(String),
}

/// One receipt, keyed as the message's parts are stored (`receipt_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// `<provider>/<canonical id>`.
    pub key: String,
    /// What it says.
    pub outcome: ReceiptOutcome,
}

/// The key under which a part a provider took under `canonical` (already in its canonical
/// form, see [`canonical_text`]) is found again by its receipt: ids are only unique per provider.
pub fn receipt_key(provider: &str, canonical: &str) -> String {
    format!("{provider}/{canonical}")
}

/// An id compared as text: case and leading zeros ignored (`00A1f` and `a1F` are one id).
pub fn canonical_text(id: &str) -> String {
    let id = id.trim();
    let trimmed = id.trim_start_matches('0');
    if trimmed.is_empty() && !id.is_empty() {
        return "0".into();
    }
    trimmed.to_ascii_lowercase()
}

/// A number written in `radix` (16 or 10) as its canonical decimal text; `None` when it is not
/// such a number (or longer than 128 bits).
pub fn canonical_number(id: &str, radix: u32) -> Option<String> {
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    u128::from_str_radix(id, radix).ok().map(|n| n.to_string())
}

/// The words that opt a number out, as `opt_out.stop_words` defaults them.
pub const STOP_WORDS: [&str; 7] = [
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "OPTOUT",
];
/// The words that opt a number back in, as `opt_out.start_words` defaults them.
pub const START_WORDS: [&str; 2] = ["START", "UNSTOP"];

/// What an inbound text asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// Opt the sender out.
    Stop,
    /// Opt the sender back in.
    Start,
    /// Nothing the service acts on.
    None,
}

impl Keyword {
    /// Its name in the metrics (`action`).
    pub fn as_str(self) -> &'static str {
        match self {
            Keyword::Stop => "stop",
            Keyword::Start => "start",
            Keyword::None => "none",
        }
    }
}

/// The configured stop and start words, case-folded.
#[derive(Debug, Clone)]
pub struct Keywords {
    stop: Vec<String>,
    start: Vec<String>,
}

impl Keywords {
    /// The lists, compared without regard to case or surrounding blanks.
    pub fn new(stop: &[String], start: &[String]) -> Self {
        let fold = |words: &[String]| words.iter().map(|w| fold(w)).collect();
        Keywords {
            stop: fold(stop),
            start: fold(start),
        }
    }

    /// What `text` asks for: the whole text, trimmed and case-folded, must be one of the words.
    pub fn classify(&self, text: &str) -> Keyword {
        let text = fold(text);
        if self.stop.contains(&text) {
            Keyword::Stop
        } else if self.start.contains(&text) {
            Keyword::Start
        } else {
            Keyword::None
        }
    }
}

fn fold(word: &str) -> String {
    word.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_compare_without_case_or_leading_zeros() {
        assert_eq!(canonical_text("00A1f"), canonical_text("a1F"));
        assert_eq!(canonical_text("000"), "0");
        assert_eq!(canonical_text(""), "");
        assert_eq!(canonical_number("1F", 16).as_deref(), Some("31"));
        assert_eq!(canonical_number("0031", 10).as_deref(), Some("31"));
        assert_eq!(canonical_number("x1", 16), None);
        assert_eq!(receipt_key("acme", "31"), "acme/31");
    }

    #[test]
    fn keywords_match_the_whole_text_whatever_its_case() {
        let words = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let keywords = Keywords::new(&words(&STOP_WORDS), &words(&START_WORDS));
        assert_eq!(keywords.classify("  Stop\n"), Keyword::Stop);
        assert_eq!(keywords.classify("optout"), Keyword::Stop);
        assert_eq!(keywords.classify("START"), Keyword::Start);
        assert_eq!(keywords.classify("please stop"), Keyword::None);
        assert_eq!(keywords.classify(""), Keyword::None);
    }
}
