//! Message templates: literal text with `{{name}}` placeholders.

use std::ops::Range;

/// A parsed message template: literal text and `{{name}}` placeholders (whitespace inside the braces is trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The content as given; parts and names are byte ranges into it rather than strings of their
    /// own.
    source: String,
    parts: Vec<Part>,
    /// Distinct placeholder names in order of first use, as byte ranges of `source`.
    vars: Vec<Range<usize>>,
    has_url: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Range<usize>),
    Var(Range<usize>),
}

/// Content that cannot be used as a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The content is empty or only whitespace.
    #[error("content is empty")]
    Empty,
    /// A placeholder is unclosed, empty or has a brace in its name; the text says which and where.
    #[error("malformed template: {0}")]
    Malformed(String),
}

/// A placeholder the lookup had no value for; holds the placeholder's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing template variable `{0}`")]
pub struct RenderError(pub String);

const OPEN: &str = "{{";
const CLOSE: &str = "}}";

impl Template {
    /// Parses `content`. A `}}` outside a placeholder is ordinary text; `{{` always opens one.
    pub fn parse(content: &str) -> Result<Self, TemplateError> {
        if content.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut vars: Vec<Range<usize>> = Vec::new();
        let mut has_url = false;
        let mut rest = 0;
        while let Some(found) = content[rest..].find(OPEN) {
            let open = rest + found;
            let inner_start = open + OPEN.len();
            let Some(len) = content[inner_start..].find(CLOSE) else {
                return Err(malformed(content, open, "`{{` without a closing `}}`"));
            };
            let inner = &content[inner_start..inner_start + len];
            if inner.contains(['{', '}']) {
                return Err(malformed(content, open, "`{` or `}` inside a placeholder"));
            }
            let name = inner.trim();
            if name.is_empty() {
                return Err(malformed(content, open, "empty placeholder name"));
            }
            let name_start = inner_start + (inner.len() - inner.trim_start().len());
            let name_range = name_start..name_start + name.len();

            if open > rest {
                has_url |= has_link(&content[rest..open]);
                parts.push(Part::Literal(rest..open));
            }
            has_url |= name == "url";
            if !vars.iter().any(|v| &content[v.clone()] == name) {
                vars.push(name_range.clone());
            }
            parts.push(Part::Var(name_range));
            rest = inner_start + len + CLOSE.len();
        }
        if rest < content.len() {
            has_url |= has_link(&content[rest..]);
            parts.push(Part::Literal(rest..content.len()));
        }
        Ok(Template {
            source: content.to_owned(),
            parts,
            vars,
            has_url,
        })
    }

    /// Renders with `lookup`; the first placeholder that `lookup` cannot answer is an error, not a panic.
    pub fn render<'a>(
        &self,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len());
        self.render_into(&mut out, lookup)?;
        Ok(out)
    }

    /// Renders into `out` (cleared first), reusing its allocation.
    ///
    /// On error `out` holds the text rendered before the missing placeholder.
    pub fn render_into<'a>(
        &self,
        out: &mut String,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(), RenderError> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(range) => out.push_str(&self.source[range.clone()]),
                Part::Var(range) => {
                    let name = &self.source[range.clone()];
                    let value = lookup(name).ok_or_else(|| RenderError(name.to_owned()))?;
                    out.push_str(value);
                }
            }
        }
        Ok(())
    }

    /// The placeholder names, each once, in order of first use.
    pub fn var_names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|range| &self.source[range.clone()])
    }

    /// True when the content has a `{{url}}` placeholder or a literal http:// or https:// link.
    pub fn contains_url(&self) -> bool {
        self.has_url
    }

    /// The content the template was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

fn malformed(content: &str, at: usize, what: &str) -> TemplateError {
    // Users count characters, not bytes; only the error path pays for the count.
    let position = content[..at].chars().count() + 1;
    TemplateError::Malformed(format!("{what} at character {position}"))
}

/// Whether `text` holds "http://" or "https://", in any letter case.
fn has_link(text: &str) -> bool {
    let bytes = text.as_bytes();
    let contains = |needle: &[u8]| {
        bytes
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    contains(b"http://") || contains(b"https://")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        move |name| map.get(name).copied()
    }

    fn render(content: &str, pairs: &[(&str, &str)]) -> Result<String, RenderError> {
        Template::parse(content).unwrap().render(vars(pairs))
    }

    #[test]
    fn renders_several_vars() {
        let out = render(
            "Hi {{name}}, 30% off today: {{url}}",
            &[("name", "Ann"), ("url", "https://x.io/a")],
        );
        assert_eq!(out.unwrap(), "Hi Ann, 30% off today: https://x.io/a");
    }

    #[test]
    fn renders_repeated_vars_and_lists_them_once() {
        let t = Template::parse("{{a}}-{{ b }}-{{a}}-{{b}}").unwrap();
        assert_eq!(
            t.render(vars(&[("a", "1"), ("b", "2")])).unwrap(),
            "1-2-1-2"
        );
        assert_eq!(t.var_names().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn vars_at_start_and_end_and_adjacent() {
        assert_eq!(
            render("{{x}} middle {{y}}", &[("x", "A"), ("y", "B")]).unwrap(),
            "A middle B"
        );
        assert_eq!(
            render("{{x}}{{y}}", &[("x", "A"), ("y", "B")]).unwrap(),
            "AB"
        );
        assert_eq!(render("{{x}}", &[("x", "")]).unwrap(), "");
    }

    #[test]
    fn whitespace_inside_braces_is_trimmed() {
        let t = Template::parse("Hi {{  name\t}}!").unwrap();
        assert_eq!(t.var_names().collect::<Vec<_>>(), ["name"]);
        assert_eq!(t.render(vars(&[("name", "Bo")])).unwrap(), "Hi Bo!");
    }

    #[test]
    fn text_without_placeholders_renders_as_is() {
        let t = Template::parse("Plain } text }} with {single} braces").unwrap();
        assert_eq!(t.var_names().count(), 0);
        assert_eq!(
            t.render(|_| None).unwrap(),
            "Plain } text }} with {single} braces"
        );
        assert_eq!(t.as_str(), "Plain } text }} with {single} braces");
    }

    #[test]
    fn missing_var_is_an_error() {
        let err = render("Hi {{name}}, code {{code}}", &[("name", "Ann")]).unwrap_err();
        assert_eq!(err, RenderError("code".to_owned()));
        assert_eq!(err.to_string(), "missing template variable `code`");
    }

    #[test]
    fn unicode_text_and_values() {
        assert_eq!(
            render(
                "您好{{ 名字 }}，验证码 {{code}} 😀",
                &[("名字", "张三"), ("code", "1234")]
            )
            .unwrap(),
            "您好张三，验证码 1234 😀"
        );
    }

    #[test]
    fn render_into_reuses_and_clears_the_buffer() {
        let t = Template::parse("Hi {{name}}").unwrap();
        let mut out = String::from("leftover from the previous recipient");
        let capacity = out.capacity();
        t.render_into(&mut out, vars(&[("name", "Ann")])).unwrap();
        assert_eq!(out, "Hi Ann");
        assert_eq!(out.capacity(), capacity);
        t.render_into(&mut out, vars(&[("name", "Bob")])).unwrap();
        assert_eq!(out, "Hi Bob");
        assert!(t.render_into(&mut out, |_| None).is_err());
    }

    #[test]
    fn empty_content() {
        assert_eq!(Template::parse(""), Err(TemplateError::Empty));
        assert_eq!(Template::parse(" \n\t"), Err(TemplateError::Empty));
        assert_eq!(TemplateError::Empty.to_string(), "content is empty");
    }

    #[test]
    fn malformed_templates() {
        let cases = [
            ("Hi {{name", "`{{` without a closing `}}` at character 4"),
            (
                "Hi {{name}} and {{",
                "`{{` without a closing `}}` at character 17",
            ),
            ("{{}}", "empty placeholder name at character 1"),
            ("Hi {{ }}", "empty placeholder name at character 4"),
            (
                "{{a {{b}}",
                "`{` or `}` inside a placeholder at character 1",
            ),
            (
                "x {{{name}}}",
                "`{` or `}` inside a placeholder at character 3",
            ),
            ("{{a}b}}", "`{` or `}` inside a placeholder at character 1"),
            ("你好 {{", "`{{` without a closing `}}` at character 4"),
        ];
        for (content, reason) in cases {
            assert_eq!(
                Template::parse(content),
                Err(TemplateError::Malformed(reason.to_owned())),
                "{content:?}"
            );
        }
        assert_eq!(
            Template::parse("{{}}").unwrap_err().to_string(),
            "malformed template: empty placeholder name at character 1"
        );
    }

    #[test]
    fn contains_url() {
        let yes = [
            "Sale: {{url}}",
            "Sale: {{ url }}",
            "See https://x.io",
            "See http://x.io",
            "See HTTPS://X.IO",
            "https://x.io/{{path}}",
        ];
        for content in yes {
            assert!(
                Template::parse(content).unwrap().contains_url(),
                "{content:?}"
            );
        }
        let no = [
            "Hi {{name}}",
            "Hi {{URL}}",
            "Hi {{url_text}}",
            "http:/x.io and https:/x.io",
            "visit x.io",
            "http{{x}}://x.io",
        ];
        for content in no {
            assert!(
                !Template::parse(content).unwrap().contains_url(),
                "{content:?}"
            );
        }
    }
}
