//! The SMPP 3.4 PDUs an ESME needs, encoded and decoded: binds, `submit_sm`, `deliver_sm`,
//! `enquire_link`, `unbind`, `generic_nack` and their responses. Every PDU is a 16-byte header
//! (length, command id, status, sequence number) and a body of C-octet strings and integers
//! (SMPP 3.4, section 3).

use bytes::{Buf, BufMut, BytesMut};

/// `generic_nack`.
pub const GENERIC_NACK: u32 = 0x8000_0000;
/// `submit_sm`.
pub const SUBMIT_SM: u32 = 0x0000_0004;
/// `deliver_sm`.
pub const DELIVER_SM: u32 = 0x0000_0005;
/// `unbind`.
pub const UNBIND: u32 = 0x0000_0006;
/// `bind_transceiver`.
pub const BIND_TRANSCEIVER: u32 = 0x0000_0009;
/// `enquire_link`.
pub const ENQUIRE_LINK: u32 = 0x0000_0015;
/// The bit that makes a command id its response's.
pub const RESPONSE: u32 = 0x8000_0000;

/// `ESME_ROK`.
pub const ROK: u32 = 0x0000_0000;
/// `ESME_RINVCMDID`: the answer to a request this ESME does not handle.
pub const RINVCMDID: u32 = 0x0000_0003;
/// `ESME_RMSGQFUL`.
pub const RMSGQFUL: u32 = 0x0000_0014;
/// `ESME_RSYSERR`: a system error.
pub const RSYSERR: u32 = 0x0000_0008;
/// `ESME_RX_T_APPN`: the ESME cannot take the message now; the SMSC is to try again later.
pub const RX_T_APPN: u32 = 0x0000_0064;
/// `ESME_RTHROTTLED`.
pub const RTHROTTLED: u32 = 0x0000_0058;

/// The header's size; also the smallest PDU.
pub const HEADER_LEN: usize = 16;
/// The largest PDU read. SMPP 3.4 sets no limit; a `submit_sm` is under 500 bytes, and a peer
/// that announces more is broken, not generous.
pub const MAX_PDU_LEN: usize = 64 * 1024;

/// A PDU's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `command_id`.
    pub command: u32,
    /// `command_status`.
    pub status: u32,
    /// `sequence_number`.
    pub sequence: u32,
}

/// A whole PDU as read: its header and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The body, after the header.
    pub body: Vec<u8>,
}

/// Why bytes are not a PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length field is below the header's size or above `MAX_PDU_LEN`.
    #[error("PDU length {0} out of range")]
    Length(u32),
    /// A body ended before a field it must hold.
    #[error("PDU body ends inside a field")]
    Truncated,
    /// A C-octet string that is not terminated within its limit.
    #[error("unterminated string field")]
    Unterminated,
}

/// Takes one whole PDU off the front of `buf`, if it holds one.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let len = length as usize;
    if !(HEADER_LEN..=MAX_PDU_LEN).contains(&len) {
        return Err(DecodeError::Length(length));
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut pdu = buf.split_to(len);
    pdu.advance(4);
    let header = Header {
        command: pdu.get_u32(),
        status: pdu.get_u32(),
        sequence: pdu.get_u32(),
    };
    Ok(Some(Frame {
        header,
        body: pdu.to_vec(),
    }))
}

/// Builds a PDU: the header, then the body's fields in order.
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A PDU of `command` with `status` and `sequence`; the length is filled in by `finish`.
    pub fn new(command: u32, status: u32, sequence: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.put_u32(0);
        buf.put_u32(command);
        buf.put_u32(status);
        buf.put_u32(sequence);
        Writer { buf }
    }

    /// A C-octet string, cut to `max - 1` bytes so that it fits its field with the NUL.
    pub fn cstr(mut self, value: &str, max: usize) -> Self {
        let bytes = value.as_bytes();
        let keep = bytes.len().min(max.saturating_sub(1));
        self.buf.extend_from_slice(&bytes[..keep]);
        self.buf.push(0);
        self
    }

    /// One octet.
    pub fn u8(mut self, value: u8) -> Self {
        self.buf.push(value);
        self
    }

    /// An octet string preceded by its length in one octet (`sm_length`, `short_message`).
    pub fn short_message(mut self, value: &[u8]) -> Self {
        let keep = value.len().min(usize::from(u8::MAX));
        self.buf.push(keep as u8);
        self.buf.extend_from_slice(&value[..keep]);
        self
    }

    /// The PDU's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// Reads a body's fields in order.
pub struct Reader<'a> {
    body: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `body` from its start.
    pub fn new(body: &'a [u8]) -> Self {
        Reader { body }
    }

    /// A C-octet string of at most `max` bytes with its NUL. Not UTF-8 is read lossily: ids and
    /// addresses are ASCII in practice.
    pub fn cstr(&mut self, max: usize) -> Result<String, DecodeError> {
        let limit = self.body.len().min(max);
        let end =
            self.body[..limit]
                .iter()
                .position(|&b| b == 0)
                .ok_or(if self.body.len() < max {
                    DecodeError::Truncated
                } else {
                    DecodeError::Unterminated
                })?;
        let value = String::from_utf8_lossy(&self.body[..end]).into_owned();
        self.body = &self.body[end + 1..];
        Ok(value)
    }

    /// One octet.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&first, rest) = self.body.split_first().ok_or(DecodeError::Truncated)?;
        self.body = rest;
        Ok(first)
    }

    /// `len` octets.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.body.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.body.split_at(len);
        self.body = rest;
        Ok(taken)
    }

    /// What is left: the optional parameters (TLVs) after the mandatory fields.
    pub fn rest(&self) -> &'a [u8] {
        self.body
    }
}

/// `bind_transceiver`.
pub fn bind_transceiver(
    sequence: u32,
    system_id: &str,
    password: &str,
    system_type: &str,
) -> Vec<u8> {
    Writer::new(BIND_TRANSCEIVER, ROK, sequence)
        .cstr(system_id, 16)
        .cstr(password, 9)
        .cstr(system_type, 13)
        .u8(0x34) // interface_version: 3.4
        .u8(0) // addr_ton
        .u8(0) // addr_npi
        .cstr("", 41) // address_range
        .finish()
}

/// A request without a body: `enquire_link`, `unbind`.
pub fn bare(command: u32, sequence: u32) -> Vec<u8> {
    Writer::new(command, ROK, sequence).finish()
}

/// The response to a request without a body in its answer (`enquire_link_resp`, `unbind_resp`,
/// `generic_nack`).
pub fn bare_response(command: u32, status: u32, sequence: u32) -> Vec<u8> {
    Writer::new(command | RESPONSE, status, sequence).finish()
}

/// `deliver_sm_resp` (its `message_id` is unused and empty).
pub fn deliver_sm_resp(status: u32, sequence: u32) -> Vec<u8> {
    Writer::new(DELIVER_SM | RESPONSE, status, sequence)
        .cstr("", 1)
        .finish()
}

/// An address with its type of number and numbering plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `*_addr_ton`.
    pub ton: u8,
    /// `*_addr_npi`.
    pub npi: u8,
    /// The address itself: digits without `+` for an international number, or a sender name.
    pub addr: String,
}

/// One `submit_sm`: the fields this ESME sets; the others are SMPP's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitSm {
    /// The sender.
    pub source: Address,
    /// The destination.
    pub destination: Address,
    /// `esm_class`: 0x40 when the message starts with a UDH.
    pub esm_class: u8,
    /// `registered_delivery`: 1 asks for a receipt.
    pub registered_delivery: u8,
    /// `data_coding`: 0 (SMSC default alphabet, GSM-7) or 8 (UCS-2).
    pub data_coding: u8,
    /// The payload: UDH (if any) and text, at most 254 octets.
    pub short_message: Vec<u8>,
}

impl SubmitSm {
    /// The PDU with `sequence`.
    pub fn encode(&self, sequence: u32) -> Vec<u8> {
        Writer::new(SUBMIT_SM, ROK, sequence)
            .cstr("", 6) // service_type
            .u8(self.source.ton)
            .u8(self.source.npi)
            .cstr(&self.source.addr, 21)
            .u8(self.destination.ton)
            .u8(self.destination.npi)
            .cstr(&self.destination.addr, 21)
            .u8(self.esm_class)
            .u8(0) // protocol_id
            .u8(0) // priority_flag
            .cstr("", 17) // schedule_delivery_time
            .cstr("", 17) // validity_period
            .u8(self.registered_delivery)
            .u8(0) // replace_if_present_flag
            .u8(self.data_coding)
            .u8(0) // sm_default_msg_id
            .short_message(&self.short_message)
            .finish()
    }
}

/// The `message_id` of a `submit_sm_resp` (absent from most error responses).
pub fn submit_sm_resp_id(body: &[u8]) -> Option<String> {
    Reader::new(body).cstr(65).ok().filter(|id| !id.is_empty())
}

/// A `deliver_sm` as read: a receipt or a mobile-originated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverSm {
    /// The sender (the handset for a mobile-originated message).
    pub source: Address,
    /// The recipient (this account's number).
    pub destination: Address,
    /// `esm_class`: bits 2–5 = 0x04 mark a delivery receipt.
    pub esm_class: u8,
    /// `data_coding`.
    pub data_coding: u8,
    /// `short_message`.
    pub short_message: Vec<u8>,
    /// The optional parameters as (tag, value).
    pub tlvs: Vec<(u16, Vec<u8>)>,
}

impl DeliverSm {
    /// Reads a `deliver_sm` body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        r.cstr(6)?; // service_type
        let source = Address {
            ton: r.u8()?,
            npi: r.u8()?,
            addr: r.cstr(21)?,
        };
        let destination = Address {
            ton: r.u8()?,
            npi: r.u8()?,
            addr: r.cstr(21)?,
        };
        let esm_class = r.u8()?;
        r.u8()?; // protocol_id
        r.u8()?; // priority_flag
        r.cstr(17)?; // schedule_delivery_time
        r.cstr(17)?; // validity_period
        r.u8()?; // registered_delivery
        r.u8()?; // replace_if_present_flag
        let data_coding = r.u8()?;
        r.u8()?; // sm_default_msg_id
        let sm_length = usize::from(r.u8()?);
        let short_message = r.bytes(sm_length)?.to_vec();
        let mut tlvs = Vec::new();
        let mut rest = r.rest();
        while rest.len() >= 4 {
            let tag = u16::from_be_bytes([rest[0], rest[1]]);
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let value = rest.get(4..4 + len).ok_or(DecodeError::Truncated)?;
            tlvs.push((tag, value.to_vec()));
            rest = &rest[4 + len..];
        }
        Ok(DeliverSm {
            source,
            destination,
            esm_class,
            data_coding,
            short_message,
            tlvs,
        })
    }

    /// True for a delivery receipt (`esm_class` bits 2–5 = 0b0001).
    pub fn is_receipt(&self) -> bool {
        self.esm_class & 0x3C == 0x04
    }
}

/// A `command_status` as SMPP names it, with its value: `ESME_RINVDSTADR (0x0000000B)`.
pub fn status_name(status: u32) -> String {
    let name = match status {
        0x00 => "ESME_ROK",
        0x01 => "ESME_RINVMSGLEN",
        0x02 => "ESME_RINVCMDLEN",
        0x03 => "ESME_RINVCMDID",
        0x04 => "ESME_RINVBNDSTS",
        0x05 => "ESME_RALYBND",
        0x06 => "ESME_RINVPRTFLG",
        0x07 => "ESME_RINVREGDLVFLG",
        0x08 => "ESME_RSYSERR",
        0x0A => "ESME_RINVSRCADR",
        0x0B => "ESME_RINVDSTADR",
        0x0C => "ESME_RINVMSGID",
        0x0D => "ESME_RBINDFAIL",
        0x0E => "ESME_RINVPASWD",
        0x0F => "ESME_RINVSYSID",
        0x11 => "ESME_RCANCELFAIL",
        0x13 => "ESME_RREPLACEFAIL",
        0x14 => "ESME_RMSGQFUL",
        0x15 => "ESME_RINVSERTYP",
        0x33 => "ESME_RINVNUMDESTS",
        0x34 => "ESME_RINVDLNAME",
        0x40 => "ESME_RINVDESTFLAG",
        0x42 => "ESME_RINVSUBREP",
        0x43 => "ESME_RINVESMCLASS",
        0x44 => "ESME_RCNTSUBDL",
        0x45 => "ESME_RSUBMITFAIL",
        0x48 => "ESME_RINVSRCTON",
        0x49 => "ESME_RINVSRCNPI",
        0x50 => "ESME_RINVDSTTON",
        0x51 => "ESME_RINVDSTNPI",
        0x53 => "ESME_RINVSYSTYP",
        0x54 => "ESME_RINVREPFLAG",
        0x55 => "ESME_RINVNUMMSGS",
        0x58 => "ESME_RTHROTTLED",
        0x61 => "ESME_RINVSCHED",
        0x62 => "ESME_RINVEXPIRY",
        0x63 => "ESME_RINVDFTMSGID",
        0x64 => "ESME_RX_T_APPN",
        0x65 => "ESME_RX_P_APPN",
        0x66 => "ESME_RX_R_APPN",
        0x67 => "ESME_RQUERYFAIL",
        0xC0 => "ESME_RINVOPTPARSTREAM",
        0xC1 => "ESME_ROPTPARNOTALLWD",
        0xC2 => "ESME_RINVPARLEN",
        0xC3 => "ESME_RMISSINGOPTPARAM",
        0xC4 => "ESME_RINVOPTPARAMVAL",
        0xFE => "ESME_RDELIVERYFAILURE",
        0xFF => "ESME_RUNKNOWNERR",
        _ => "command_status",
    };
    format!("{name} (0x{status:08X})")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn bind_transceiver_is_laid_out_as_smpp_says() {
        let pdu = bind_transceiver(7, "esme", "pw", "");
        let mut expected = vec![0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 7];
        expected.extend_from_slice(b"esme\0pw\0\0\x34\0\0\0");
        expected[3] = expected.len() as u8;
        assert_eq!(pdu, expected);
    }

    #[test]
    fn frames_are_taken_whole_and_one_at_a_time() {
        let mut buf = BytesMut::new();
        let first = bare(ENQUIRE_LINK, 1);
        let second = deliver_sm_resp(ROK, 2);
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second[..5]);
        let frame = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(
            frame.header,
            Header {
                command: ENQUIRE_LINK,
                status: ROK,
                sequence: 1
            }
        );
        assert!(frame.body.is_empty());
        assert_eq!(take_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(&second[5..]);
        let frame = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.header.command, DELIVER_SM | RESPONSE);
        assert_eq!(frame.body, vec![0]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_length_out_of_range_is_refused() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0, 0, 0, 0][..]);
        assert_eq!(take_frame(&mut buf), Err(DecodeError::Length(3)));
        let mut buf = BytesMut::from(&[0xFFu8, 0, 0, 0][..]);
        assert!(take_frame(&mut buf).is_err());
    }

    #[test]
    fn deliver_sm_reads_back_what_a_submit_sm_writes() {
        // submit_sm and deliver_sm share their body's layout.
        let submit = SubmitSm {
            source: Address {
                ton: 1,
                npi: 1,
                addr: "8613800000001".into(),
            },
            destination: Address {
                ton: 5,
                npi: 0,
                addr: "Shop".into(),
            },
            esm_class: 0x04,
            registered_delivery: 0,
            data_coding: 0,
            short_message: b"id:1 stat:DELIVRD".to_vec(),
        };
        let mut pdu = submit.encode(3);
        // A TLV after the mandatory fields: receipted_message_id.
        pdu.extend_from_slice(&[0x00, 0x1E, 0x00, 0x02, b'1', 0]);
        let len = pdu.len() as u32;
        pdu[..4].copy_from_slice(&len.to_be_bytes());
        let frame = take_frame(&mut BytesMut::from(&pdu[..])).unwrap().unwrap();
        let deliver = DeliverSm::decode(&frame.body).unwrap();
        assert_eq!(deliver.source, submit.source);
        assert_eq!(deliver.destination, submit.destination);
        assert_eq!(deliver.short_message, submit.short_message);
        assert_eq!(deliver.tlvs, vec![(0x001E, b"1\0".to_vec())]);
        assert!(deliver.is_receipt());
    }

    #[test]
    fn a_truncated_body_is_an_error_not_a_panic() {
        let pdu = SubmitSm {
            source: Address {
                ton: 1,
                npi: 1,
                addr: "1".into(),
            },
            destination: Address {
                ton: 1,
                npi: 1,
                addr: "2".into(),
            },
            esm_class: 0,
            registered_delivery: 1,
            data_coding: 0,
            short_message: b"hello".to_vec(),
        }
        .encode(1);
        let body = &pdu[HEADER_LEN..];
        for cut in 0..body.len() {
            assert!(DeliverSm::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(DeliverSm::decode(body).is_ok());
    }

    #[test]
    fn statuses_are_named_with_their_value() {
        assert_eq!(status_name(0x0B), "ESME_RINVDSTADR (0x0000000B)");
        assert_eq!(status_name(0x0400), "command_status (0x00000400)");
        assert_eq!(submit_sm_resp_id(b"abc\0"), Some("abc".into()));
        assert_eq!(submit_sm_resp_id(b""), None);
    }
}
