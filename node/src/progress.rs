//! Progress display for client commands: an indicatif bar on a terminal,
//! plain log lines (every 10 %) when stderr is not one.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::control::ProgressUpdate;

pub struct Display {
    bar: Option<ProgressBar>,
    last_decile: Option<u64>,
}

impl Display {
    pub fn new() -> Self {
        Display {
            bar: None,
            last_decile: None,
        }
    }

    pub fn update(&mut self, p: &ProgressUpdate) {
        if std::io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let b = ProgressBar::new(p.total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(p.what.clone());
                b
            });
            bar.set_length(p.total);
            bar.set_position(p.done);
        } else {
            let decile = (p.done * 10).checked_div(p.total).unwrap_or(10);
            if self.last_decile != Some(decile) {
                self.last_decile = Some(decile);
                eprintln!(
                    "{}: {} / {} bytes ({}%)",
                    p.what,
                    p.done,
                    p.total,
                    decile * 10
                );
            }
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
