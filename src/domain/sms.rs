//! Choosing an SMS encoding and counting the segments a text is sent in.

use serde::{Deserialize, Serialize};

/// How a message's text is encoded on the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The GSM 03.38 7-bit alphabet: 160 septets in a single SMS.
    Gsm7,
    /// UCS-2 (UTF-16 in practice): 70 code units in a single SMS.
    Ucs2,
}

string_enum!(Encoding {
    Gsm7 => "gsm7",
    Ucs2 => "ucs2",
});

/// The encoding of a text, its length in that encoding's units (septets or UTF-16 code units) and
/// the number of SMS it is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmsParts {
    /// GSM-7 if every char can be written in it, else UCS-2.
    pub encoding: Encoding,
    /// Septets for GSM-7, UTF-16 code units for UCS-2.
    pub units: u32,
    /// How many SMS the text takes, at least 1.
    pub segments: u32,
}

/// A single SMS carries 140 bytes; a concatenated one gives 6 of them to the UDH that links the
/// parts, leaving 153 septets or 67 UTF-16 units.
const GSM7_SINGLE: u32 = 160;
const GSM7_PART: u32 = 153;
const UCS2_SINGLE: u32 = 70;
const UCS2_PART: u32 = 67;

/// Septets an ASCII char costs in GSM-7: 1 for the basic set, 2 for the extension table (escape
/// plus char), 0 when GSM-7 cannot carry it (control chars other than LF, CR and form feed, DEL,
/// and the backtick).
const ASCII_SEPTETS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut c = b' ';
    while c <= b'~' {
        table[c as usize] = 1;
        c += 1;
    }
    table[b'`' as usize] = 0;
    let extension = b"^{}\\[~]|";
    let mut i = 0;
    while i < extension.len() {
        table[extension[i] as usize] = 2;
        i += 1;
    }
    table[b'\n' as usize] = 1;
    table[b'\r' as usize] = 1;
    table[0x0C] = 2; // form feed, in the extension table
    table
};

/// Septets a char costs in GSM-7, 0 when it is not in the GSM 03.38 basic set or extension table.
#[inline]
fn gsm7_septets(c: char) -> u32 {
    if c.is_ascii() {
        return u32::from(ASCII_SEPTETS[c as usize]);
    }
    match c {
        '£' | '¥' | 'è' | 'é' | 'ù' | 'ì' | 'ò' | 'Ç' | 'Ø' | 'ø' | 'Å' | 'å' | 'Δ' | 'Φ' | 'Γ'
        | 'Λ' | 'Ω' | 'Π' | 'Ψ' | 'Σ' | 'Θ' | 'Ξ' | 'Æ' | 'æ' | 'ß' | 'É' | '¤' | '¡' | 'Ä'
        | 'Ö' | 'Ñ' | 'Ü' | '§' | '¿' | 'ä' | 'ö' | 'ñ' | 'ü' | 'à' => 1,
        '€' => 2,
        _ => 0,
    }
}

/// GSM-7 when every char is in the GSM 03.38 basic set or its extension table (extension chars ^ { } \ [ ~ ] | € and form feed cost two septets), else UCS-2 counted in UTF-16 code units.
///
/// Segments use the usual estimate of 160/153 septets and 70/67 units; a carrier that refuses to
/// split an escape sequence or a surrogate pair across parts may occasionally need one more.
/// Runs once per recipient, so it does not allocate and reads the text at most twice.
pub fn analyze(text: &str) -> SmsParts {
    let mut septets: usize = 0;
    for c in text.chars() {
        let cost = gsm7_septets(c);
        if cost == 0 {
            let units = text.chars().map(char::len_utf16).sum();
            return parts(Encoding::Ucs2, units, UCS2_SINGLE, UCS2_PART);
        }
        septets += cost as usize;
    }
    parts(Encoding::Gsm7, septets, GSM7_SINGLE, GSM7_PART)
}

fn parts(encoding: Encoding, units: usize, single: u32, part: u32) -> SmsParts {
    // Saturating: only a text of over 4 GiB could overflow, and it would be refused anyway.
    let units = u32::try_from(units).unwrap_or(u32::MAX);
    let segments = if units <= single {
        1
    } else {
        units.div_ceil(part)
    };
    SmsParts {
        encoding,
        units,
        segments,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn gsm(units: u32, segments: u32) -> SmsParts {
        SmsParts {
            encoding: Encoding::Gsm7,
            units,
            segments,
        }
    }

    fn ucs2(units: u32, segments: u32) -> SmsParts {
        SmsParts {
            encoding: Encoding::Ucs2,
            units,
            segments,
        }
    }

    #[test]
    fn empty_text_is_one_gsm_segment() {
        assert_eq!(analyze(""), gsm(0, 1));
    }

    #[test]
    fn gsm7_boundaries() {
        assert_eq!(analyze(&"a".repeat(160)), gsm(160, 1));
        assert_eq!(analyze(&"a".repeat(161)), gsm(161, 2));
        assert_eq!(analyze(&"a".repeat(153 * 2)), gsm(306, 2));
        assert_eq!(analyze(&"a".repeat(153 * 2 + 1)), gsm(307, 3));
    }

    #[test]
    fn extension_chars_cost_two_septets() {
        let text = format!("{}€", "a".repeat(159));
        assert_eq!(analyze(&text), gsm(161, 2));
        for c in ['^', '{', '}', '\\', '[', '~', ']', '|', '€', '\u{0C}'] {
            assert_eq!(analyze(&c.to_string()), gsm(2, 1), "{c:?}");
        }
        assert_eq!(analyze(&"{".repeat(80)), gsm(160, 1));
        assert_eq!(analyze(&format!("{}{{", "{".repeat(80))), gsm(162, 2));
    }

    #[test]
    fn whole_basic_set_is_gsm7() {
        let ascii: String = (' '..='~').filter(|c| !"`^{}\\[~]|".contains(*c)).collect();
        let non_ascii = "£¥èéùìòÇØøÅåΔΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà";
        let text = format!("{ascii}{non_ascii}\n\r@$_");
        let chars = text.chars().count() as u32;
        assert_eq!(analyze(&text), gsm(chars, 1));
    }

    #[test]
    fn chars_outside_gsm7_switch_to_ucs2() {
        for c in [
            '`', '\t', '\u{7F}', 'á', 'ç', '\u{2126}', /* ohm sign, not the GSM omega */
            '“', '’', '你',
        ] {
            let text = format!("Hello {c}");
            assert_eq!(analyze(&text).encoding, Encoding::Ucs2, "{c:?}");
        }
    }

    #[test]
    fn ucs2_boundaries() {
        assert_eq!(analyze(&"你".repeat(70)), ucs2(70, 1));
        assert_eq!(analyze(&"你".repeat(71)), ucs2(71, 2));
        assert_eq!(analyze(&"你".repeat(67 * 2)), ucs2(134, 2));
        assert_eq!(analyze(&"你".repeat(67 * 2 + 1)), ucs2(135, 3));
    }

    #[test]
    fn chinese_text_is_ucs2() {
        assert_eq!(analyze("您的验证码是123456"), ucs2(12, 1));
    }

    #[test]
    fn ucs2_counts_every_char_once_even_gsm_extension_ones() {
        // Once in UCS-2, "€" and "{" are single code units like any other char.
        assert_eq!(analyze("你€{"), ucs2(3, 1));
    }

    #[test]
    fn emoji_is_a_surrogate_pair() {
        assert_eq!(analyze("😀"), ucs2(2, 1));
        assert_eq!(analyze(&"😀".repeat(35)), ucs2(70, 1));
        assert_eq!(analyze(&format!("a{}", "😀".repeat(35))), ucs2(71, 2));
    }

    #[test]
    fn encoding_strings_match_serde() {
        for e in Encoding::ALL {
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
            assert_eq!(e.as_str().parse::<Encoding>(), Ok(e));
        }
        assert_eq!(Encoding::Gsm7.as_str(), "gsm7");
        assert_eq!(Encoding::Ucs2.as_str(), "ucs2");
        assert!("utf8".parse::<Encoding>().is_err());
    }
}
