//! Pure domain types and rules: the batch state machine, validated values, phone numbers, SMS
//! encoding and templates. Nothing in here performs I/O, so all of it is tested in-process.

/// Gives a fieldless enum `ALL`, `as_str`, `FromStr` and `Display` from one table of names, so the
/// string forms cannot drift apart. The names must match the enum's serde `rename_all`; each
/// module tests that they do.
///
/// Invoked only from the modules below, where `super::state::UnknownValue` resolves.
macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// The name used in the API and in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = super::state::UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(super::state::UnknownValue(s.to_owned())),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

pub mod batch;
pub mod counts;
pub mod lifecycle;
pub mod phone;
pub mod receipt;
pub mod seen;
pub mod sms;
pub mod state;
pub mod template;
