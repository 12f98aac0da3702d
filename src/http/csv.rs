//! A streaming CSV reader for recipient uploads: bytes go in as they arrive, rows come out, and
//! memory holds one record at a time. The first row is the header and must have a `phone` column;
//! every other column becomes a template var.
//!
//! The reader is strict where csv-core is lenient, because a file it would silently misread is
//! worse than one it refuses: quotes must follow RFC 4180 (a field is quoted whole or not at all,
//! quotes inside a quoted field are doubled, and a quoted field is closed), every row has the
//! header's number of fields, fields are UTF-8 without NUL characters, and a record is at most
//! [`MAX_RECORD_BYTES`] and [`MAX_FIELDS`] (so that an unclosed quote or a run of commas cannot
//! make memory grow with the file). Errors
//! name the line of the file (blank lines count; a quoted field may span lines).

use csv_core::{ReadRecordResult, Reader};

/// The largest record the reader holds, in bytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// The most fields a record may have.
pub const MAX_FIELDS: usize = 10_000;

/// A malformed upload, with the line it was found on (the header is line 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CsvError {
    /// 1-based line of the file.
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

/// One recipient row: the phone and the other columns as a JSON object (None when there are none).
pub type Row = (String, Option<String>);

/// Push-based CSV reader.
pub struct CsvRecords {
    reader: Reader,
    out: Vec<u8>,
    ends: Vec<usize>,
    out_len: usize,
    ends_len: usize,
    header: Option<Header>,
    done: bool,
    quotes: QuoteCheck,
    /// The first bytes, held until it is known whether they are a UTF-8 byte order mark.
    bom: Option<Vec<u8>>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Where the strict scanner is within a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// Between records: line breaks are skipped (csv-core skips blank lines too).
    RecordStart,
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field or, doubled, is a literal quote.
    QuoteInQuoted,
}

/// Reads the same bytes as csv-core, to refuse what csv-core would accept leniently, and counts
/// the file's lines.
#[derive(Debug)]
struct QuoteCheck {
    state: Quoting,
    /// The line being read.
    line: u64,
    /// The line the current record starts on.
    record_line: u64,
    /// The line the open quoted field starts on.
    quote_line: u64,
}

impl QuoteCheck {
    fn new() -> Self {
        QuoteCheck {
            state: Quoting::RecordStart,
            line: 1,
            record_line: 1,
            quote_line: 1,
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> Result<(), CsvError> {
        for &b in bytes {
            let terminator = b == b'\n' || b == b'\r';
            self.state = match self.state {
                Quoting::RecordStart if terminator => Quoting::RecordStart,
                Quoting::RecordStart | Quoting::FieldStart => {
                    if self.state == Quoting::RecordStart {
                        self.record_line = self.line;
                    }
                    match b {
                        b'"' => {
                            self.quote_line = self.line;
                            Quoting::Quoted
                        }
                        b',' => Quoting::FieldStart,
                        _ if terminator => Quoting::RecordStart,
                        _ => Quoting::Unquoted,
                    }
                }
                Quoting::Unquoted => match b {
                    b'"' => {
                        return Err(self.error(
                            "a quote inside an unquoted field (quote the whole field and \
                             double the quotes in it)",
                        ));
                    }
                    b',' => Quoting::FieldStart,
                    _ if terminator => Quoting::RecordStart,
                    _ => Quoting::Unquoted,
                },
                Quoting::Quoted if b == b'"' => Quoting::QuoteInQuoted,
                Quoting::Quoted => Quoting::Quoted,
                Quoting::QuoteInQuoted => match b {
                    b'"' => Quoting::Quoted,
                    b',' => Quoting::FieldStart,
                    _ if terminator => Quoting::RecordStart,
                    _ => {
                        return Err(self.error(
                            "text after the closing quote of a field (double the quotes inside \
                             a quoted field)",
                        ));
                    }
                },
            };
            if b == b'\n' {
                self.line += 1;
            }
        }
        Ok(())
    }

    /// At the end of the input: a quoted field must have been closed.
    fn finish(&self) -> Result<(), CsvError> {
        if self.state == Quoting::Quoted {
            return Err(CsvError {
                line: self.quote_line,
                message: "a quoted field is never closed".into(),
            });
        }
        Ok(())
    }

    fn error(&self, message: &str) -> CsvError {
        CsvError {
            line: self.line,
            message: message.into(),
        }
    }
}

struct Header {
    columns: Vec<String>,
    phone: usize,
}

impl Default for CsvRecords {
    fn default() -> Self {
        Self::new()
    }
}

impl CsvRecords {
    /// A reader waiting for its header.
    pub fn new() -> Self {
        CsvRecords {
            reader: Reader::new(),
            out: vec![0; 4096],
            ends: vec![0; 32],
            out_len: 0,
            ends_len: 0,
            header: None,
            done: false,
            quotes: QuoteCheck::new(),
            bom: Some(Vec::with_capacity(BOM.len())),
        }
    }

    /// Feeds the next bytes; calls `emit` for every complete data row.
    pub fn feed(&mut self, mut input: &[u8], emit: &mut impl FnMut(Row)) -> Result<(), CsvError> {
        if let Some(head) = &mut self.bom {
            // A byte order mark is dropped before anything reads the bytes.
            while head.len() < BOM.len() && BOM.starts_with(head) {
                let Some((&b, rest)) = input.split_first() else {
                    return Ok(());
                };
                head.push(b);
                input = rest;
            }
            let head = std::mem::take(head);
            self.bom = None;
            if head != BOM {
                self.read(&head, false, emit)?;
            }
        }
        self.read(input, false, emit)
    }

    /// Signals the end of the input, flushing a last row without a line break.
    pub fn finish(&mut self, emit: &mut impl FnMut(Row)) -> Result<(), CsvError> {
        if let Some(head) = self.bom.take()
            && head != BOM
        {
            self.read(&head, false, emit)?;
        }
        self.quotes.finish()?;
        self.read(&[], true, emit)?;
        if self.header.is_none() {
            return Err(CsvError {
                line: 1,
                message: "empty upload: no header row".into(),
            });
        }
        Ok(())
    }

    /// Reads records from `input`. csv-core takes an empty input as the end of the data, so it
    /// gets one only when `eof` says so.
    fn read(
        &mut self,
        mut input: &[u8],
        eof: bool,
        emit: &mut impl FnMut(Row),
    ) -> Result<(), CsvError> {
        loop {
            if self.done || (input.is_empty() && !eof) {
                return Ok(());
            }
            let (result, nin, nout, nend) = self.reader.read_record(
                input,
                &mut self.out[self.out_len..],
                &mut self.ends[self.ends_len..],
            );
            self.quotes.scan(&input[..nin])?;
            input = &input[nin..];
            self.out_len += nout;
            self.ends_len += nend;
            match result {
                ReadRecordResult::InputEmpty => return Ok(()),
                ReadRecordResult::OutputFull => {
                    if self.out.len() >= MAX_RECORD_BYTES {
                        return Err(CsvError {
                            line: self.quotes.record_line,
                            message: format!(
                                "a record over {MAX_RECORD_BYTES} bytes (an unclosed quote?)"
                            ),
                        });
                    }
                    let len = (self.out.len() * 2).min(MAX_RECORD_BYTES);
                    self.out.resize(len, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    if self.ends.len() >= MAX_FIELDS {
                        return Err(CsvError {
                            line: self.quotes.record_line,
                            message: format!("a record with over {MAX_FIELDS} fields"),
                        });
                    }
                    let len = (self.ends.len() * 2).min(MAX_FIELDS);
                    self.ends.resize(len, 0);
                }
                ReadRecordResult::Record => {
                    let row = self.record()?;
                    self.out_len = 0;
                    self.ends_len = 0;
                    if let Some(row) = row {
                        emit(row);
                    }
                }
                ReadRecordResult::End => {
                    self.done = true;
                    return Ok(());
                }
            }
        }
    }

    fn fields(&self) -> Result<Vec<&str>, CsvError> {
        let line = self.quotes.record_line;
        let mut start = 0;
        let mut fields = Vec::with_capacity(self.ends_len);
        for &end in &self.ends[..self.ends_len] {
            let field = std::str::from_utf8(&self.out[start..end]).map_err(|e| CsvError {
                line,
                message: format!(
                    "field {} is not valid UTF-8 (byte {} of the field)",
                    fields.len() + 1,
                    e.valid_up_to() + 1
                ),
            })?;
            if field.contains('\0') {
                return Err(CsvError {
                    line,
                    message: format!("field {} has a NUL character", fields.len() + 1),
                });
            }
            fields.push(field);
            start = end;
        }
        Ok(fields)
    }

    /// Turns the buffered record into a row (None for the header).
    fn record(&mut self) -> Result<Option<Row>, CsvError> {
        let line = self.quotes.record_line;
        let fields = self.fields()?;
        let Some(header) = &self.header else {
            let columns: Vec<String> = fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let f = if i == 0 {
                        f.trim_start_matches('\u{feff}')
                    } else {
                        f
                    };
                    f.trim().to_string()
                })
                .collect();
            let phone = columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case("phone"))
                .ok_or_else(|| CsvError {
                    line,
                    message: "the header has no `phone` column".into(),
                })?;
            self.header = Some(Header { columns, phone });
            return Ok(None);
        };
        if fields.len() != header.columns.len() {
            return Err(CsvError {
                line,
                message: format!(
                    "expected {} fields, found {}",
                    header.columns.len(),
                    fields.len()
                ),
            });
        }
        let phone = fields[header.phone].trim().to_string();
        let vars = if header.columns.len() > 1 {
            let map: serde_json::Map<String, serde_json::Value> = header
                .columns
                .iter()
                .zip(&fields)
                .enumerate()
                .filter(|(i, _)| *i != header.phone)
                .map(|(_, (k, v))| (k.clone(), serde_json::Value::String((*v).to_string())))
                .collect();
            Some(serde_json::Value::Object(map).to_string())
        } else {
            None
        };
        Ok(Some((phone, vars)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Result<Vec<Row>, CsvError> {
        let mut rows = Vec::new();
        let mut reader = CsvRecords::new();
        for chunk in input.chunks(piece.max(1)) {
            reader.feed(chunk, &mut |r| rows.push(r))?;
        }
        reader.finish(&mut |r| rows.push(r))?;
        Ok(rows)
    }

    #[test]
    fn reads_rows_whatever_the_chunking() {
        let input = b"name,phone\nAnn,+8613800001234\n\"Bo, Jr\",13800001235\r\nCy,+8613800001236";
        for piece in [1, 2, 3, 7, 64, 1024] {
            let rows = parse_in_pieces(input, piece).expect("valid CSV");
            assert_eq!(rows.len(), 3, "piece {piece}");
            assert_eq!(rows[0].0, "+8613800001234");
            assert_eq!(rows[1].1.as_deref(), Some(r#"{"name":"Bo, Jr"}"#));
            assert_eq!(rows[2].0, "+8613800001236");
        }
    }

    #[test]
    fn phone_only_rows_have_no_vars() {
        let rows = parse_in_pieces(b"phone\n1\n2\n", 4).expect("valid");
        assert_eq!(rows, vec![("1".into(), None), ("2".into(), None)]);
    }

    #[test]
    fn header_without_phone_is_line_1() {
        let err = parse_in_pieces(b"name,number\nAnn,1\n", 5).expect_err("no phone");
        assert_eq!(err.line, 1);
        assert!(err.message.contains("phone"));
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let err = parse_in_pieces(b"phone,name\n1,a\n2,b\n3\n4,d\n", 3).expect_err("short row");
        assert_eq!(err.line, 4);
        assert_eq!(err.to_string(), "line 4: expected 2 fields, found 1");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let err = parse_in_pieces(b"phone,name\n1,a\n2,\xff\xfe\n", 100).expect_err("bad bytes");
        assert_eq!(err.line, 3);
        assert_eq!(
            err.to_string(),
            "line 3: field 2 is not valid UTF-8 (byte 1 of the field)"
        );
    }

    #[test]
    fn lines_count_blank_lines_and_line_breaks_in_quotes() {
        let input = b"phone,note\r\n1,a\r\n\r\n2,\"two\nlines\"\r\n3\r\n";
        for piece in [1, 2, 5, 100] {
            let err = parse_in_pieces(input, piece).expect_err("short row");
            assert_eq!(err.line, 6, "piece {piece}: {err}");
        }
    }

    #[test]
    fn bad_quotes_name_the_line() {
        let cases: [(&[u8], u64, &str); 4] = [
            (b"phone,name\n1,a\n2,\"Bo\n3,c\n", 3, "never closed"),
            (b"phone,name\n1,a\n2,b\"o\n", 3, "inside an unquoted field"),
            (
                b"phone,name\n1,a\n2,b\n3,\"c\"x\n",
                4,
                "after the closing quote",
            ),
            (
                b"\"phone\",name\n\"1\",\"a \"\"b\"\"\"\n\"2\n",
                3,
                "never closed",
            ),
        ];
        for (input, line, what) in cases {
            for piece in [1, 3, 100] {
                let err = parse_in_pieces(input, piece).expect_err("bad quote");
                assert_eq!(err.line, line, "{err}");
                assert!(err.message.contains(what), "{err}");
            }
        }
        let rows = parse_in_pieces(b"phone,name\n\"1\",\"a \"\"b\"\"\"\n", 2).expect("valid");
        assert_eq!(rows[0].1.as_deref(), Some(r#"{"name":"a \"b\""}"#));
    }

    #[test]
    fn a_byte_order_mark_is_dropped_whatever_the_chunking() {
        for piece in [1, 2, 4, 100] {
            let rows = parse_in_pieces(b"\xEF\xBB\xBF\"phone\"\n1\n", piece).expect("valid");
            assert_eq!(rows, vec![("1".into(), None)], "piece {piece}");
        }
        // Two bytes only, and not a mark.
        assert!(parse_in_pieces(b"\xEF\xBB", 1).is_err());
        assert_eq!(parse_in_pieces(b"ph", 1).expect_err("no phone").line, 1);
    }

    #[test]
    fn nul_characters_are_refused() {
        let err = parse_in_pieces(b"phone,name\n1,a\0b\n", 4).expect_err("NUL");
        assert_eq!(err.line, 2);
    }

    #[test]
    fn an_unclosed_quote_does_not_grow_memory_with_the_file() {
        let mut input = b"phone,name\n1,\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES * 3));
        let err = parse_in_pieces(&input, 64 * 1024).expect_err("record too long");
        assert_eq!(err.line, 2);
    }

    #[test]
    fn a_record_with_too_many_fields_is_refused() {
        let row = |fields: usize| format!("{}\n", vec!["1"; fields].join(","));
        let header = (0..MAX_FIELDS).fold(String::from("phone"), |mut h, i| {
            if i > 0 {
                h.push_str(&format!(",c{i}"));
            }
            h
        });
        let input = format!("{header}\n{}{}", row(MAX_FIELDS), row(MAX_FIELDS + 1));
        let err = parse_in_pieces(input.as_bytes(), 4096).expect_err("too many fields");
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("fields"), "{err}");
    }

    #[test]
    fn empty_upload_is_an_error() {
        assert!(parse_in_pieces(b"", 10).is_err());
        assert_eq!(
            parse_in_pieces(b"phone\n", 10).expect("header only"),
            vec![]
        );
    }

    #[test]
    fn long_fields_grow_the_buffer() {
        let long = "x".repeat(20_000);
        let input = format!("phone,note\n1,{long}\n");
        let rows = parse_in_pieces(input.as_bytes(), 333).expect("valid");
        assert!(rows[0].1.as_deref().is_some_and(|v| v.len() > 20_000));
    }
}
