//! The bulk selection: which files a command takes from the command line
//! and under `-r` directories.

pub mod glob;
pub mod walk;
