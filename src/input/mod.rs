//! What walbust needs to take input from users safely: files read with a size cap and
//! regular files only ([`user_file`]), and "did you mean" suggestions for misspelt names
//! ([`spelling`]). It imports nothing else of walbust.

pub mod spelling;
pub mod user_file;
