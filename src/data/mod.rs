//! Data sets and image preprocessing. Now: the bundled digits and photographs used by the demo and
//! the training tests.

pub mod digits;
