//! What a `deliver_sm` says: a delivery receipt (by its TLVs `receipted_message_id` and
//! `message_state` when present, else by the text form `id:… stat:… err:…`), or a
//! mobile-originated message. Ids are brought to one canonical form per account
//! (`message_id_format`), so that a receipt's id meets its `submit_sm_resp`'s.

use super::pdu::DeliverSm;
use super::settings::MessageIdFormat;
use super::text::{decode_gsm7, decode_ucs2};
use crate::domain::receipt::{
    Receipt, ReceiptOutcome, canonical_number, canonical_text, receipt_key,
};
use crate::provider::InboundSms;

/// `receipted_message_id`.
const RECEIPTED_MESSAGE_ID: u16 = 0x001E;
/// `message_state`.
const MESSAGE_STATE: u16 = 0x0427;
/// `network_error_code`: type (1 octet), then the error (2 octets).
const NETWORK_ERROR_CODE: u16 = 0x0423;

/// Where an id was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A `submit_sm_resp`.
    Submit,
    /// A receipt.
    Receipt,
}

/// The canonical form of `id` read on `side` of an account with `format`: decimal numbers for
/// the two numeric formats (an id that is no such number is compared as text), else the text
/// without case or leading zeros.
pub fn canonical_id(format: MessageIdFormat, side: Side, id: &str) -> String {
    let radix = match (format, side) {
        (MessageIdFormat::Text, _) => return canonical_text(id),
        (MessageIdFormat::HexDecimal, Side::Submit)
        | (MessageIdFormat::DecimalHex, Side::Receipt) => 16,
        (MessageIdFormat::HexDecimal, Side::Receipt)
        | (MessageIdFormat::DecimalHex, Side::Submit) => 10,
    };
    canonical_number(id, radix).unwrap_or_else(|| canonical_text(id))
}

/// What a `deliver_sm` was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// A final receipt.
    Receipt(Receipt),
    /// A mobile-originated message.
    Inbound(InboundSms),
    /// Nothing to store (an intermediate receipt, or one without an id): acknowledged as it is.
    Ignored(String),
}

/// Reads `deliver` as it came to the account `provider`.
pub fn read(provider: &str, format: MessageIdFormat, deliver: &DeliverSm) -> Delivered {
    let text = short_text(deliver);
    if !deliver.is_receipt() {
        let mut from = deliver.source.addr.clone();
        if deliver.source.ton == 1 && !from.starts_with('+') {
            from.insert(0, '+');
        }
        return Delivered::Inbound(InboundSms {
            provider: provider.to_owned(),
            from,
            to: deliver.destination.addr.clone(),
            text,
        });
    }
    let tlv = |tag: u16| {
        deliver
            .tlvs
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    };
    let fields = TextReceipt::parse(&text);
    let id = tlv(RECEIPTED_MESSAGE_ID)
        .map(|v| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned())
        .filter(|id| !id.is_empty())
        .or(fields.id);
    let Some(id) = id else {
        return Delivered::Ignored("a receipt without an id".into());
    };
    let stat = match tlv(MESSAGE_STATE).and_then(|v| v.first()) {
        Some(state) => state_name(*state).to_owned(),
        None => match fields.stat {
            Some(stat) => stat.to_ascii_uppercase(),
            None => return Delivered::Ignored(format!("a receipt for {id} without a state")),
        },
    };
    let err = match tlv(NETWORK_ERROR_CODE) {
        Some(&[_, hi, lo]) => format!("{:03}", u16::from_be_bytes([hi, lo])),
        _ => fields.err.unwrap_or_else(|| "000".into()),
    };
    let outcome = match stat.as_str() {
        "DELIVRD" => ReceiptOutcome::Delivered,
        "ENROUTE" | "ACCEPTD" | "SCHEDULED" => {
            return Delivered::Ignored(format!("an intermediate receipt ({stat}) for {id}"));
        }
        other => ReceiptOutcome::Failed(format!("{}: {other} err {err}", failure_word(other))),
    };
    Delivered::Receipt(Receipt {
        key: receipt_key(provider, &canonical_id(format, Side::Receipt, &id)),
        outcome,
    })
}

/// The short message as text (after its UDH, if any), or the `message_payload` TLV's.
fn short_text(deliver: &DeliverSm) -> String {
    let mut bytes = deliver.short_message.as_slice();
    if bytes.is_empty()
        && let Some((_, payload)) = deliver.tlvs.iter().find(|(t, _)| *t == 0x0424)
    {
        bytes = payload;
    }
    if deliver.esm_class & 0x40 != 0
        && let Some(&len) = bytes.first()
    {
        bytes = bytes.get(1 + usize::from(len)..).unwrap_or_default();
    }
    match deliver.data_coding {
        8 => decode_ucs2(bytes),
        // Latin-1 (3) and 8-bit data: byte by byte.
        3 | 4 => bytes.iter().map(|&b| char::from(b)).collect(),
        _ => decode_gsm7(bytes),
    }
}

/// `message_state` values as the text form names them.
fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ENROUTE",
        2 => "DELIVRD",
        3 => "EXPIRED",
        4 => "DELETED",
        5 => "UNDELIV",
        6 => "ACCEPTD",
        8 => "REJECTD",
        _ => "UNKNOWN",
    }
}

/// The word a failed message's error starts with.
fn failure_word(stat: &str) -> &'static str {
    match stat {
        "UNDELIV" => "undelivered",
        "EXPIRED" => "expired",
        "REJECTD" => "rejected",
        "DELETED" => "deleted",
        _ => "unknown",
    }
}

/// The fields of the text form (SMPP 3.4, appendix B): `id:… sub:… dlvrd:… submit date:… done
/// date:… stat:… err:… text:…`, read by their names, in any case and order.
#[derive(Debug, Default, PartialEq, Eq)]
struct TextReceipt {
    id: Option<String>,
    stat: Option<String>,
    err: Option<String>,
}

impl TextReceipt {
    fn parse(text: &str) -> Self {
        let mut fields = TextReceipt::default();
        // `text:` ends the fields: what follows is the message's own text.
        let head = match text.to_ascii_lowercase().find("text:") {
            Some(at) => &text[..at],
            None => text,
        };
        for token in head.split_ascii_whitespace() {
            let Some((name, value)) = token.split_once(':') else {
                continue;
            };
            let value = Some(value.to_owned()).filter(|v| !v.is_empty());
            match name.to_ascii_lowercase().as_str() {
                "id" => fields.id = value,
                "stat" => fields.stat = value,
                "err" => fields.err = value,
                _ => {}
            }
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::smpp::pdu::Address;

    fn deliver(esm_class: u8, text: &str, tlvs: Vec<(u16, Vec<u8>)>) -> DeliverSm {
        DeliverSm {
            source: Address {
                ton: 1,
                npi: 1,
                addr: "4915112345678".into(),
            },
            destination: Address {
                ton: 5,
                npi: 0,
                addr: "Shop".into(),
            },
            esm_class,
            data_coding: 0,
            short_message: text.as_bytes().to_vec(),
            tlvs,
        }
    }

    #[test]
    fn numeric_formats_meet_across_hex_and_decimal() {
        let hex = canonical_id(MessageIdFormat::HexDecimal, Side::Submit, "1F");
        let dec = canonical_id(MessageIdFormat::HexDecimal, Side::Receipt, "0000000031");
        assert_eq!(hex, dec);
        let dec = canonical_id(MessageIdFormat::DecimalHex, Side::Submit, "31");
        let hex = canonical_id(MessageIdFormat::DecimalHex, Side::Receipt, "1f");
        assert_eq!(hex, dec);
        assert_eq!(
            canonical_id(MessageIdFormat::Text, Side::Receipt, "00Ab"),
            canonical_id(MessageIdFormat::Text, Side::Submit, "aB")
        );
    }

    #[test]
    fn the_text_form_is_read_by_its_field_names() {
        let text = "id:0042 sub:001 dlvrd:000 submit date:2612061200 done date:2612061201 \
                    stat:UNDELIV err:001 text:Hi stat:DELIVRD";
        let got = read("acme", MessageIdFormat::Text, &deliver(0x04, text, vec![]));
        assert_eq!(
            got,
            Delivered::Receipt(Receipt {
                key: "acme/42".into(),
                outcome: ReceiptOutcome::Failed("undelivered: UNDELIV err 001".into()),
            })
        );
        let text = "id:7 sub:001 dlvrd:001 submit date:2612061200 done date:2612061201 \
                    stat:DELIVRD err:000 text:";
        let got = read("acme", MessageIdFormat::Text, &deliver(0x04, text, vec![]));
        assert_eq!(
            got,
            Delivered::Receipt(Receipt {
                key: "acme/7".into(),
                outcome: ReceiptOutcome::Delivered,
            })
        );
    }

    #[test]
    fn tlvs_win_over_the_text() {
        let tlvs = vec![
            // In the receipt's base, like the text form's id: decimal for `hex_decimal`.
            (RECEIPTED_MESSAGE_ID, b"0000000031\0".to_vec()),
            (MESSAGE_STATE, vec![3]),
            (NETWORK_ERROR_CODE, vec![3, 0, 5]),
        ];
        let got = read(
            "acme",
            MessageIdFormat::HexDecimal,
            &deliver(0x04, "id:99 stat:DELIVRD", tlvs),
        );
        let submitted = canonical_id(MessageIdFormat::HexDecimal, Side::Submit, "1F");
        assert_eq!(
            got,
            Delivered::Receipt(Receipt {
                key: format!("acme/{submitted}"),
                outcome: ReceiptOutcome::Failed("expired: EXPIRED err 005".into()),
            })
        );
    }

    #[test]
    fn intermediate_receipts_and_inbound_messages() {
        let tlvs = vec![
            (RECEIPTED_MESSAGE_ID, b"5".to_vec()),
            (MESSAGE_STATE, vec![1]),
        ];
        assert!(matches!(
            read("acme", MessageIdFormat::Text, &deliver(0x04, "", tlvs)),
            Delivered::Ignored(_)
        ));
        assert_eq!(
            read("acme", MessageIdFormat::Text, &deliver(0, "Stop", vec![])),
            Delivered::Inbound(InboundSms {
                provider: "acme".into(),
                from: "+4915112345678".into(),
                to: "Shop".into(),
                text: "Stop".into(),
            })
        );
    }
}
