//! The connection string parser: the input is a libpq URL or `key=value` string, parsed
//! with a fixed environment (`walbust_fuzz::env`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use walbust::postgres::ConnInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match ConnInfo::parse(text, walbust_fuzz::env) {
        Ok(info) => {
            let _ = format!("{info:?}");
            let _ = info.describe();
            for (host, port) in info.targets() {
                let _ = info.endpoint(host, port);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
