//! A rendered text as the `short_message`s of its `submit_sm`s: GSM-7 (one septet per octet,
//! `data_coding` 0) when every char is in the GSM 03.38 alphabet, else UCS-2 (UTF-16 big-endian,
//! `data_coding` 8); a text longer than one SMS as concatenated parts, each behind an 8-bit
//! reference UDH (`05 00 03 ref total seq`), `esm_class` 0x40.

use crate::domain::sms::{Encoding, analyze};

/// `data_coding` of the SMSC's default alphabet (GSM-7).
pub const DATA_CODING_GSM7: u8 = 0;
/// `data_coding` of UCS-2.
pub const DATA_CODING_UCS2: u8 = 8;
/// `esm_class` of a message that starts with a UDH.
pub const ESM_UDHI: u8 = 0x40;

/// The GSM 03.38 basic set by code; 0x1B is the escape to the extension table.
const BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// The extension table: char and its code after the escape.
const EXTENSION: [(char, u8); 10] = [
    ('\u{0C}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

const ESCAPE: u8 = 0x1B;
const GSM7_SINGLE: usize = 160;
const GSM7_PART: usize = 153;
const UCS2_SINGLE: usize = 70;
const UCS2_PART: usize = 67;

/// The septets of one char, or `None` outside GSM-7.
fn gsm7(c: char, out: &mut Vec<u8>) -> Option<()> {
    if c != '\u{1B}'
        && let Some(code) = BASIC.iter().position(|&b| b == c)
    {
        out.push(code as u8);
        return Some(());
    }
    let (_, code) = EXTENSION.iter().find(|(e, _)| *e == c)?;
    out.extend_from_slice(&[ESCAPE, *code]);
    Some(())
}

/// A text split for SMPP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// `data_coding` of every part.
    pub data_coding: u8,
    /// The text of each part, in order, without UDH.
    pub texts: Vec<Vec<u8>>,
}

impl Parts {
    /// Splits `text`: in GSM-7 when the domain says it fits (the same rule that counted its
    /// segments), else in UCS-2. A part never ends inside an escape sequence or a surrogate
    /// pair.
    pub fn of(text: &str) -> Parts {
        if analyze(text).encoding == Encoding::Gsm7 {
            let mut septets = Vec::with_capacity(text.len());
            for c in text.chars() {
                if gsm7(c, &mut septets).is_none() {
                    // Not reached: `analyze` said every char is in GSM-7. UCS-2 carries anything.
                    return Self::ucs2(text);
                }
            }
            let texts = split(&septets, 1, GSM7_SINGLE, GSM7_PART, |part| {
                part.last() == Some(&ESCAPE)
            });
            return Parts {
                data_coding: DATA_CODING_GSM7,
                texts,
            };
        }
        Self::ucs2(text)
    }

    fn ucs2(text: &str) -> Parts {
        let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let texts = split(&bytes, 2, UCS2_SINGLE, UCS2_PART, |part| {
            let n = part.len();
            n >= 2 && (0xD8..=0xDB).contains(&part[n - 2])
        });
        Parts {
            data_coding: DATA_CODING_UCS2,
            texts,
        }
    }

    /// The `(esm_class, short_message)` of each part: the text alone for a single part, behind
    /// a UDH with `reference` for concatenated ones.
    pub fn messages(&self, reference: u8) -> Vec<(u8, Vec<u8>)> {
        if self.texts.len() == 1 {
            return vec![(0, self.texts[0].clone())];
        }
        let total = u8::try_from(self.texts.len()).unwrap_or(u8::MAX);
        self.texts
            .iter()
            .take(usize::from(u8::MAX))
            .enumerate()
            .map(|(i, text)| {
                let mut sm = vec![0x05, 0x00, 0x03, reference, total, (i + 1) as u8];
                sm.extend_from_slice(text);
                (ESM_UDHI, sm)
            })
            .collect()
    }
}

/// Splits `units` (of `width` bytes each) into one part if it fits `single` units, else into
/// parts of at most `part` units, moving a unit to the next part when `splits_pair` says the
/// part would end inside a pair.
fn split(
    bytes: &[u8],
    width: usize,
    single: usize,
    part: usize,
    splits_pair: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    if bytes.len() <= single * width {
        return vec![bytes.to_vec()];
    }
    let mut parts = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut take = rest.len().min(part * width);
        if take < rest.len() && splits_pair(&rest[..take]) {
            take -= width;
        }
        let (head, tail) = rest.split_at(take);
        parts.push(head.to_vec());
        rest = tail;
    }
    parts
}

/// Decodes GSM-7 septets (one per octet) back to text, for inbound messages; a code outside
/// the tables reads as `?`.
pub fn decode_gsm7(septets: &[u8]) -> String {
    let mut out = String::with_capacity(septets.len());
    let mut escaped = false;
    for &s in septets {
        if escaped {
            escaped = false;
            out.push(
                EXTENSION
                    .iter()
                    .find(|(_, code)| *code == s)
                    .map_or('?', |(c, _)| *c),
            );
        } else if s == ESCAPE {
            escaped = true;
        } else {
            out.push(BASIC.get(usize::from(s)).copied().unwrap_or('?'));
        }
    }
    out
}

/// Decodes UCS-2 / UTF-16 big-endian text, for inbound messages.
pub fn decode_ucs2(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(parts: &Parts) -> String {
        let bytes: Vec<u8> = parts.texts.concat();
        match parts.data_coding {
            DATA_CODING_GSM7 => decode_gsm7(&bytes),
            _ => decode_ucs2(&bytes),
        }
    }

    #[test]
    fn gsm7_text_goes_as_septets_and_reads_back() {
        let text = "Hi Ann, 5€ off [today] {only} ~ ^_^ | \\ ¿Qué? Ünïcode";
        // 'é' and 'Ü' are in GSM-7, 'ï' is not: the whole text goes as UCS-2.
        assert_eq!(Parts::of(text).data_coding, DATA_CODING_UCS2);
        let text = "Hi Ann, 5€ off [today] {only} ~ ^_^ | \\ ¿Qué? Ü@£$¥";
        let parts = Parts::of(text);
        assert_eq!(parts.data_coding, DATA_CODING_GSM7);
        assert_eq!(parts.texts.len(), 1);
        assert_eq!(whole(&parts), text);
        assert_eq!(&parts.texts[0][..3], &[0x48, 0x69, 0x20]);
    }

    #[test]
    fn part_counts_match_the_domain() {
        for (text, segments) in [
            ("a".repeat(160), 1),
            ("a".repeat(161), 2),
            ("a".repeat(306), 2),
            ("a".repeat(307), 3),
            ("ж".repeat(70), 1),
            ("ж".repeat(71), 2),
            ("ж".repeat(134), 2),
            ("ж".repeat(135), 3),
        ] {
            let parts = Parts::of(&text);
            assert_eq!(
                parts.texts.len(),
                segments,
                "{} chars",
                text.chars().count()
            );
            assert_eq!(analyze(&text).segments as usize, segments);
            assert_eq!(whole(&parts), text);
        }
    }

    #[test]
    fn a_part_never_ends_inside_an_escape_or_a_surrogate_pair() {
        // 152 septets, then '€' (escape + code) across the 153-septet boundary.
        let text = format!("{}€{}", "a".repeat(152), "b".repeat(20));
        let parts = Parts::of(&text);
        assert_eq!(parts.texts[0].len(), 152);
        assert_eq!(whole(&parts), text);
        // 66 units, then an emoji (a surrogate pair) across the 67-unit boundary.
        let text = format!("{}😀{}", "ж".repeat(66), "ж".repeat(10));
        let parts = Parts::of(&text);
        assert_eq!(parts.texts[0].len(), 132);
        assert_eq!(whole(&parts), text);
    }

    #[test]
    fn concatenated_parts_carry_a_consistent_udh() {
        let parts = Parts::of(&"ж".repeat(100));
        let messages = parts.messages(0x2A);
        assert_eq!(messages.len(), 2);
        for (i, (esm, sm)) in messages.iter().enumerate() {
            assert_eq!(*esm, ESM_UDHI);
            assert_eq!(&sm[..6], &[5, 0, 3, 0x2A, 2, i as u8 + 1]);
            assert!(sm.len() <= 140);
        }
        let single = Parts::of("short").messages(1);
        assert_eq!(single, vec![(0, b"short".to_vec())]);
    }
}
