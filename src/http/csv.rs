//! A streaming CSV reader for recipient uploads: bytes go in as they arrive, rows come out, and
//! memory holds one record at a time. The first row is the header and must have a `phone` column;
//! every other column becomes a template var.

use csv_core::{ReadRecordResult, Reader};

/// A malformed upload, with the line it was found on (the header is line 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CsvError {
    /// 1-based line (record) number.
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
    records: u64,
    header: Option<Header>,
    done: bool,
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
            records: 0,
            header: None,
            done: false,
        }
    }

    /// Feeds the next bytes; calls `emit` for every complete data row.
    pub fn feed(&mut self, input: &[u8], emit: &mut impl FnMut(Row)) -> Result<(), CsvError> {
        self.read(input, false, emit)
    }

    /// Signals the end of the input, flushing a last row without a line break.
    pub fn finish(&mut self, emit: &mut impl FnMut(Row)) -> Result<(), CsvError> {
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
            input = &input[nin..];
            self.out_len += nout;
            self.ends_len += nend;
            match result {
                ReadRecordResult::InputEmpty => return Ok(()),
                ReadRecordResult::OutputFull => {
                    let len = self.out.len() * 2;
                    self.out.resize(len, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let len = self.ends.len() * 2;
                    self.ends.resize(len, 0);
                }
                ReadRecordResult::Record => {
                    self.records += 1;
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
        let line = self.records;
        let mut start = 0;
        let mut fields = Vec::with_capacity(self.ends_len);
        for &end in &self.ends[..self.ends_len] {
            let field = std::str::from_utf8(&self.out[start..end]).map_err(|_| CsvError {
                line,
                message: "not valid UTF-8".into(),
            })?;
            fields.push(field);
            start = end;
        }
        Ok(fields)
    }

    /// Turns the buffered record into a row (None for the header).
    fn record(&mut self) -> Result<Option<Row>, CsvError> {
        let line = self.records;
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
