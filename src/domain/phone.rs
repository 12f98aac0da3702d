//! Phone numbers normalised to E.164 with the `phonenumber` crate.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{LazyLock, OnceLock};

use phonenumber::PhoneNumber;
use phonenumber::country::{Id, Source};
use phonenumber::metadata::{DATABASE, Descriptor, Metadata};
use regex::{Regex, RegexBuilder};
use serde::Serialize;

use super::state::UnknownValue;

/// A phone number in E.164 form ("+8613800001234"); can only be built by parsing.
///
/// Validity follows libphonenumber's metadata, not just the length: "+8613800000001" and
/// "+8613912340002" are valid (CN mobiles: "+86" then "13x" and 8 digits), while
/// "+8612345678901" is well-formed but invalid because no CN range starts with 123.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct E164Phone(String);

impl E164Phone {
    /// Parses `raw` (surrounding whitespace trimmed; spaces, dashes, dots and parentheses allowed)
    /// and checks it against the numbering plan. Numbers without a leading "+" (or an
    /// international dialling prefix such as "00") are read as national numbers of
    /// `default_region`.
    pub fn parse(raw: &str, default_region: Region) -> Result<Self, PhoneError> {
        let raw = raw.trim();
        match parse_e164(raw) {
            Some(answer) => answer,
            None => parse_any(raw, default_region),
        }
    }

    /// The number in E.164 form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number in E.164 form, giving up the wrapper.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for E164Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Any form of number, through the `phonenumber` crate's parser.
fn parse_any(raw: &str, default_region: Region) -> Result<E164Phone, PhoneError> {
    let number = parse_number(raw, default_region)?;
    let code = number.code().value();
    let national = number.national().to_string();
    // E.164 has no room for an extension, and an SMS cannot reach one: dropping it would
    // silently send to the switchboard instead.
    if number.extension().is_some() || !is_valid(code, &national) {
        return Err(PhoneError::Invalid);
    }
    // What `number.format().mode(Mode::E164)` writes, without the formatter's search for a
    // national display pattern (regex matches that E.164 does not use).
    Ok(E164Phone(format!("+{code}{national}")))
}

/// A number already in E.164 form ("+" and 7 to 15 digits, the form most lists carry), without
/// the crate's parser (three quarters of the cost of a number): what that parser makes of it
/// in the cases where the national number is simply the digits after the country code. `None`
/// for every other case (a leading zero, a national prefix or carrier code its region would
/// strip), which the parser handles. The unit tests compare the two on every country code.
fn parse_e164(raw: &str) -> Option<Result<E164Phone, PhoneError>> {
    let digits = raw.strip_prefix('+')?;
    if !(7..=15).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return None;
    }
    // The parser's country code: the shortest prefix that is one.
    let (code, plans, national) = (1..=3).find_map(|len| {
        let code: u16 = digits[..len].parse().ok()?;
        PLANS
            .get(&code)
            .map(|plans| (code, plans.get(), &digits[len..]))
    })?;
    if national.starts_with('0') {
        return None;
    }
    // The region whose national prefix rules the parser applies is the one validity uses.
    let region = region_of(plans, national);
    if region.is_some_and(|plan| plan.strips_from(national)) {
        return None;
    }
    Some(if region.is_some_and(|plan| plan.has(national)) {
        Ok(E164Phone(format!("+{code}{national}")))
    } else {
        Err(PhoneError::Invalid)
    })
}

/// Whether `national` is a number of the numbering plan of country code `code`: what
/// `PhoneNumber::is_valid` decides, on the same metadata, with regexes compiled once and shared
/// by every thread. The crate matches through a regex cache behind one mutex, keyed by each
/// pattern's text (hashed at every match, and the match itself runs under the lock): that was
/// most of the cost of validating a number, and it made two threads slower than one.
fn is_valid(code: u16, national: &str) -> bool {
    PLANS
        .get(&code)
        .and_then(|plans| region_of(plans.get(), national))
        .is_some_and(|plan| plan.has(national))
}

/// The plan of the region a national number of a country code belongs to: the code's only
/// region (or non-geographic plan), whatever the number's leading digits; for a code several
/// regions share (+1, +7, +44…), the first whose leading digits match or, for one without
/// leading digits, whose plan has the number.
fn region_of<'p>(plans: &'p [Plan], national: &str) -> Option<&'p Plan> {
    match plans {
        [only] if only.alone => Some(only),
        _ => plans.iter().find(|plan| plan.owns(national)),
    }
}

/// The numbering plans of every country code of the metadata, each compiled on first use.
static PLANS: LazyLock<HashMap<u16, CodePlans>> = LazyLock::new(|| {
    DATABASE
        .iter()
        .map(|meta| {
            let code = meta.country_code();
            let plans = OnceLock::new();
            (code, CodePlans { code, plans })
        })
        .collect()
});

/// The plans of the regions of one country code, in the metadata's order.
struct CodePlans {
    code: u16,
    plans: OnceLock<Vec<Plan>>,
}

impl CodePlans {
    fn get(&self) -> &[Plan] {
        self.plans.get_or_init(|| {
            let regions = DATABASE.region(&self.code).unwrap_or_default();
            match regions[..] {
                // "001": a non-geographic code (+800, +882…), whose metadata has no region id of
                // its own.
                [region] => {
                    let meta = if region == "001" {
                        DATABASE
                            .by_code(&self.code)
                            .and_then(|metas| metas.into_iter().next())
                    } else {
                        DATABASE.by_id(region)
                    };
                    meta.map(|meta| Plan::compile(meta, true))
                        .into_iter()
                        .collect()
                }
                _ => regions
                    .iter()
                    .filter_map(|region| DATABASE.by_id(*region))
                    .map(|meta| Plan::compile(meta, false))
                    .collect(),
            }
        })
    }
}

/// One region's numbering plan: the general pattern, and the pattern of each kind of number
/// (fixed line, mobile, toll free…); a valid number matches the first and one of the others.
struct Plan {
    alone: bool,
    leading_digits: Option<Regex>,
    general: Option<Pattern>,
    kinds: Vec<Pattern>,
    national_prefix: Option<String>,
    /// The pattern of national prefixes and carrier codes the parser strips; `Err` if the
    /// region has one that does not compile.
    prefix_for_parsing: Result<Option<Regex>, ()>,
}

impl Plan {
    fn compile(meta: &Metadata, alone: bool) -> Plan {
        let d = meta.descriptors();
        let kinds = [
            d.premium_rate(),
            d.toll_free(),
            d.shared_cost(),
            d.voip(),
            d.personal_number(),
            d.pager(),
            d.uan(),
            d.voicemail(),
            d.fixed_line(),
            d.mobile(),
        ];
        Plan {
            alone,
            leading_digits: meta.leading_digits().and_then(|r| prefix_regex(r.as_str())),
            general: Pattern::compile(d.general()),
            kinds: kinds
                .into_iter()
                .flatten()
                .filter_map(Pattern::compile)
                .collect(),
            national_prefix: meta.national_prefix().map(str::to_owned),
            prefix_for_parsing: match meta.national_prefix_for_parsing() {
                None => Ok(None),
                Some(pattern) => prefix_regex(pattern.as_str()).map(Some).ok_or(()),
            },
        }
    }

    /// Whether a number of a code shared by several regions is this region's: its leading
    /// digits, or, for a region without any, its plan.
    fn owns(&self, national: &str) -> bool {
        match &self.leading_digits {
            Some(leading) => leading.is_match(national),
            None => self.has(national),
        }
    }

    /// Whether the parser would strip a national prefix or carrier code from `national` (or
    /// might: a pattern that does not compile counts as yes).
    fn strips_from(&self, national: &str) -> bool {
        self.national_prefix
            .as_deref()
            .is_some_and(|prefix| national.starts_with(prefix))
            || match &self.prefix_for_parsing {
                Ok(pattern) => pattern.as_ref().is_some_and(|p| p.is_match(national)),
                Err(()) => true,
            }
    }

    fn has(&self, national: &str) -> bool {
        self.general.as_ref().is_some_and(|g| g.matches(national))
            && self.kinds.iter().any(|kind| kind.matches(national))
    }
}

/// A descriptor's lengths and pattern.
struct Pattern {
    lengths: Box<[u16]>,
    regex: Regex,
}

impl Pattern {
    fn compile(descriptor: &Descriptor) -> Option<Pattern> {
        Some(Pattern {
            lengths: descriptor.possible_length().into(),
            regex: prefix_regex(descriptor.national_number().as_str())?,
        })
    }

    /// `Descriptor::is_match`: a possible length, and the pattern matching from the start.
    fn matches(&self, national: &str) -> bool {
        (self.lengths.is_empty() || self.lengths.contains(&(national.len() as u16)))
            && self.regex.is_match(national)
    }
}

/// A metadata pattern that matches from the start of the text, as the crate matches them (a
/// leftmost match at 0), with the crate's option (whitespace in patterns ignored). None if it
/// does not compile (the crate would panic on it): a plan without its general pattern has no
/// valid number, and a kind without its pattern is left out.
fn prefix_regex(source: &str) -> Option<Regex> {
    RegexBuilder::new(&format!("^(?:{source})"))
        .ignore_whitespace(true)
        .build()
        .ok()
}

/// `phonenumber::parse` with a default region applies that region's national-prefix rules even to
/// a number that carries another country code: with region US, "+86 138 0000 1234" loses its
/// leading 1 and becomes invalid, and "+86 12345678901" becomes the valid but wrong
/// "+862345678901". So the region is only passed for numbers that need it, and a number dialled
/// abroad through the region's international prefix is parsed again as "+<digits after it>".
fn parse_number(raw: &str, region: Region) -> Result<PhoneNumber, PhoneError> {
    let unparsable = |_| PhoneError::Unparsable;
    let first = raw
        .chars()
        .find(|c| c.is_ascii_digit() || PLUS_SIGNS.contains(c));
    if first.is_some_and(|c| PLUS_SIGNS.contains(&c)) {
        return phonenumber::parse(None, raw).map_err(unparsable);
    }
    let number = phonenumber::parse(Some(region.0), raw).map_err(unparsable)?;
    let meta = DATABASE.by_id(region.as_str());
    if number.code().source() != Source::Idd
        || meta.is_some_and(|m| m.country_code() == number.code().value())
    {
        return Ok(number);
    }
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    let after_idd = meta
        .and_then(|m| m.international_prefix())
        .and_then(|idd| idd.find(&digits))
        .filter(|m| m.start() == 0)
        .map(|m| &digits[m.end()..])
        .ok_or(PhoneError::Unparsable)?;
    phonenumber::parse(None, format!("+{after_idd}")).map_err(unparsable)
}

/// The ASCII plus and the full-width plus that CJK keyboards produce.
const PLUS_SIGNS: [char; 2] = ['+', '\u{FF0B}'];

/// Why a string is not accepted as a phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// The text does not look like a phone number at all.
    #[error("not a phone number")]
    Unparsable,
    /// It looks like a phone number, but no such number exists in its country's numbering plan.
    #[error("not a valid number")]
    Invalid,
}

/// An ISO 3166 region for numbers written without "+", e.g. "CN", "US".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(Id);

impl Region {
    /// The region's upper-case ISO 3166 code, e.g. "CN".
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

impl FromStr for Region {
    type Err = UnknownValue;

    /// Accepts a two-letter code in any case ("cn", "CN"); codes the phone metadata does not know
    /// are an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownValue(s.to_owned());
        let code = s.trim();
        if code.len() != 2 {
            return Err(unknown());
        }
        let id = Id::from_str(&code.to_ascii_uppercase()).map_err(|_| unknown())?;
        // `phonenumber::parse` unwraps the region's metadata, so a region without any must never
        // reach it.
        match DATABASE.by_id(id.as_ref()) {
            Some(_) => Ok(Region(id)),
            None => Err(unknown()),
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn region(code: &str) -> Region {
        code.parse().unwrap()
    }

    fn e164(raw: &str, code: &str) -> Result<String, PhoneError> {
        E164Phone::parse(raw, region(code)).map(E164Phone::into_string)
    }

    #[test]
    fn international_form_with_spaces() {
        assert_eq!(e164("+86 138 0000 1234", "US").unwrap(), "+8613800001234");
        assert_eq!(e164("  +8613800001234\n", "CN").unwrap(), "+8613800001234");
        assert_eq!(e164("+86-138-0000-1234", "CN").unwrap(), "+8613800001234");
    }

    #[test]
    fn national_form_uses_the_default_region() {
        assert_eq!(e164("13800001234", "CN").unwrap(), "+8613800001234");
        assert_eq!(e164("(202) 456-1111", "US").unwrap(), "+12024561111");
        assert_eq!(e164("202-456-1111", "us").unwrap(), "+12024561111");
    }

    #[test]
    fn a_country_code_wins_over_the_default_region() {
        let cases = [
            ("+86 138 0000 1234", "+8613800001234"),
            ("(+86) 138-0000-1234", "+8613800001234"),
            ("tel:+86-138-0000-1234", "+8613800001234"),
            ("\u{FF0B}86 138 0000 1234", "+8613800001234"),
            ("+44 117 945 0000", "+441179450000"),
            ("+1 (202) 456-1111", "+12024561111"),
        ];
        for code in ["CN", "US", "GB", "FR"] {
            for (raw, expected) in cases {
                assert_eq!(e164(raw, code).unwrap(), expected, "{raw:?} in {code}");
            }
        }
        // Read with US rules this would be the valid "+862345678901".
        assert_eq!(e164("+86 12345678901", "US"), Err(PhoneError::Invalid));
    }

    #[test]
    fn international_dialling_prefix_of_the_default_region() {
        assert_eq!(e164("0086 138 0000 1234", "CN").unwrap(), "+8613800001234");
        assert_eq!(e164("0044 117 945 0000", "CN").unwrap(), "+441179450000");
        assert_eq!(e164("001 202 456 1111", "CN").unwrap(), "+12024561111");
        assert_eq!(
            e164("011 86 138 0000 1234", "US").unwrap(),
            "+8613800001234"
        );
        assert_eq!(e164("011 44 117 945 0000", "US").unwrap(), "+441179450000");
    }

    #[test]
    fn national_prefix_and_country_code_without_plus() {
        assert_eq!(e164("0 138 0000 1234", "CN").unwrap(), "+8613800001234");
        assert_eq!(
            e164("+86 (0)138 0000 1234", "CN").unwrap(),
            "+8613800001234"
        );
        assert_eq!(e164("8613800001234", "CN").unwrap(), "+8613800001234");
        assert_eq!(e164("1 202 456 1111", "US").unwrap(), "+12024561111");
        assert_eq!(e164("138.0000.1234", "CN").unwrap(), "+8613800001234");
    }

    #[test]
    fn test_numbers_other_modules_use_are_valid() {
        for n in [
            "+8613800000001",
            "+8613800000002",
            "+8613912340001",
            "+8613912340002",
            "+8613800001234",
        ] {
            assert_eq!(e164(n, "CN").unwrap(), n);
        }
    }

    #[test]
    fn garbage_is_unparsable() {
        for raw in ["", "   ", "hello", "phone", "+", "++", "-", "()"] {
            assert_eq!(e164(raw, "CN"), Err(PhoneError::Unparsable), "{raw:?}");
        }
    }

    #[test]
    fn wrong_numbers_are_rejected() {
        for raw in [
            "123",
            "+86 138",
            "1380000123",
            "138000012345",
            "+8612345678901",
            "+1 555",
            "+999 1234567",
        ] {
            assert!(e164(raw, "CN").is_err(), "{raw:?}");
        }
        assert_eq!(e164("+8612345678901", "CN"), Err(PhoneError::Invalid));
    }

    #[test]
    fn extensions_are_rejected() {
        assert_eq!(
            e164("+1 202-456-1111 ext. 12", "US"),
            Err(PhoneError::Invalid)
        );
    }

    #[test]
    fn display_and_serialize_are_the_e164_form() {
        let phone = E164Phone::parse("138 0000 1234", region("CN")).unwrap();
        assert_eq!(phone.to_string(), "+8613800001234");
        assert_eq!(phone.as_str(), "+8613800001234");
        assert_eq!(serde_json::to_string(&phone).unwrap(), "\"+8613800001234\"");
    }

    #[test]
    fn region_codes() {
        assert_eq!(region("cn"), region("CN"));
        assert_eq!(region("us").to_string(), "US");
        for bad in ["", "C", "XX", "ZZ", "CHN", "china", "c1"] {
            assert_eq!(
                bad.parse::<Region>(),
                Err(UnknownValue(bad.into())),
                "{bad:?}"
            );
        }
    }

    /// Random digits, the same on every run.
    fn digits() -> impl FnMut(usize) -> String {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        move |len| {
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'0' + (seed % 10) as u8)
                })
                .collect()
        }
    }

    /// National numbers to try for a region: its example numbers (valid, of every kind), the
    /// same behind its national prefix, and random digits of every length a national number can
    /// have, most of them invalid.
    fn nationals(meta: &Metadata, random: &mut impl FnMut(usize) -> String) -> Vec<String> {
        let d = meta.descriptors();
        let examples: Vec<String> = [Some(d.general()), d.fixed_line(), d.mobile(), d.toll_free()]
            .into_iter()
            .chain([d.premium_rate(), d.voip(), d.pager(), d.uan()])
            .flatten()
            .filter_map(|d| d.example().map(str::to_owned))
            .collect();
        let prefixed = examples
            .iter()
            .filter_map(|e| meta.national_prefix().map(|p| format!("{p}{e}")))
            .collect::<Vec<_>>();
        let random = (3..=15).flat_map(|len| (0..8).map(|_| random(len)).collect::<Vec<_>>());
        examples.into_iter().chain(prefixed).chain(random).collect()
    }

    /// The compiled plans decide as the crate does, for every country code of the metadata.
    #[test]
    fn validity_agrees_with_the_crate_for_every_country_code() {
        let mut random = digits();
        let (mut checked, mut valid) = (0, 0);
        for meta in DATABASE.iter() {
            for national in nationals(meta, &mut random) {
                let raw = format!("+{}{national}", meta.country_code());
                let Ok(number) = phonenumber::parse(None, &raw) else {
                    continue;
                };
                let ours = is_valid(number.code().value(), &number.national().to_string());
                assert_eq!(ours, number.is_valid(), "{raw}");
                checked += 1;
                valid += usize::from(ours);
            }
        }
        // Both answers were exercised, across the whole metadata.
        assert!(
            checked > 20_000 && valid > 1_000,
            "{checked} checked, {valid} valid"
        );
    }

    /// Numbers in E.164 form read without the parser come out as the parser reads them, for
    /// every country code; and most of them are read that way.
    #[test]
    fn e164_input_reads_as_the_parser_reads_it() {
        let mut random = digits();
        let (mut tried, mut fast, mut valid) = (0, 0, 0);
        for meta in DATABASE.iter() {
            for national in nationals(meta, &mut random) {
                let raw = format!("+{}{national}", meta.country_code());
                tried += 1;
                if let Some(answer) = parse_e164(&raw) {
                    assert_eq!(answer, parse_any(&raw, region("US")), "{raw}");
                    fast += 1;
                    valid += usize::from(answer.is_ok());
                }
            }
        }
        assert!(
            fast * 2 > tried && valid > 1_000,
            "{fast} of {tried} read without the parser, {valid} valid"
        );
    }
}
