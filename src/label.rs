//! The label table: one code per structure, used by segmentation, planning, the overlay, the
//! writers and the simulators alike.
//!
//! Label maps are `Array2<u8>` holding [`Label::code`]s, so that they can be written as
//! one-channel PNG and DICOM without conversion. Codes are stable: files written by one version
//! are read by the next. Code 6 (`nerve`) is reserved for the nerve detector.
//!
//! Colours are the Okabe–Ito palette (Okabe & Ito, "Color Universal Design", 2008), which stays
//! distinguishable with the common colour-vision deficiencies; its eight colours are used up by
//! the labels and the needle drawing, so the nerve takes Paul Tol's "wine" (Tol, "Colour
//! schemes", SRON/EPS/TN/09-002, muted scheme), dark enough to stand apart from all of them.

use serde::Serialize;

/// A structure the segmenter can label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Label {
    /// Everything else.
    Background = 0,
    /// Tendon.
    Tendon = 1,
    /// Bone surface band.
    Bone = 2,
    /// Acoustic shadow beneath bone.
    Shadow = 3,
    /// Joint space or effusion.
    Joint = 4,
    /// Vessel.
    Vessel = 5,
    /// Nerve (reserved: no detector labels it yet).
    Nerve = 6,
}

impl Label {
    /// Every label, in code order.
    pub const ALL: [Label; 7] = [
        Label::Background,
        Label::Tendon,
        Label::Bone,
        Label::Shadow,
        Label::Joint,
        Label::Vessel,
        Label::Nerve,
    ];

    /// The value stored in label maps.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The label of a stored value, if it is one.
    pub const fn from_code(code: u8) -> Option<Label> {
        if (code as usize) < Label::ALL.len() {
            Some(Label::ALL[code as usize])
        } else {
            None
        }
    }

    /// The name shown to people (legends, reports).
    pub const fn name(self) -> &'static str {
        match self {
            Label::Background => "background",
            Label::Tendon => "tendon",
            Label::Bone => "bone surface",
            Label::Shadow => "acoustic shadow",
            Label::Joint => "joint space / effusion",
            Label::Vessel => "vessel",
            Label::Nerve => "nerve",
        }
    }

    /// Display colour, RGB (background: black, never drawn).
    pub const fn colour(self) -> [u8; 3] {
        match self {
            Label::Background => [0, 0, 0],
            Label::Tendon => [230, 159, 0],
            Label::Bone => [240, 228, 66],
            Label::Shadow => [0, 114, 178],
            Label::Joint => [0, 158, 115],
            Label::Vessel => [213, 94, 0],
            Label::Nerve => [136, 34, 85],
        }
    }

    /// Whether a needle must keep its margin from this structure unless told otherwise: bone
    /// and its shadow (the needle stops or cannot be seen), vessels and nerves (harm).
    pub const fn forbidden_by_default(self) -> bool {
        matches!(
            self,
            Label::Bone | Label::Shadow | Label::Vessel | Label::Nerve
        )
    }
}

impl PartialEq<Label> for u8 {
    fn eq(&self, other: &Label) -> bool {
        *self == other.code()
    }
}

impl PartialEq<u8> for Label {
    fn eq(&self, other: &u8) -> bool {
        self.code() == *other
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, l) in Label::ALL.iter().enumerate() {
            assert_eq!(l.code() as usize, i);
            assert_eq!(Label::from_code(l.code()), Some(*l));
        }
        assert_eq!(Label::from_code(7), None);
        assert_eq!(Label::Nerve.code(), 6);
    }

    #[test]
    fn colours_are_distinct() {
        for a in Label::ALL {
            for b in Label::ALL {
                assert!(
                    a == b || a.colour() != b.colour(),
                    "{a} and {b} share a colour"
                );
            }
        }
    }
}
