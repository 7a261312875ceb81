//! The control file format, shared by the module (which reads it) and [`crate::Control`] (which
//! writes it). Safe Rust only.

#![forbid(unsafe_code)]

use std::fmt::Write as _;

/// The faults commanded by one version of the control file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    /// `token=present|absent`
    pub(crate) token_present: bool,
    /// `invalidate_sessions=N`: every increase kills the sessions open at that moment.
    pub(crate) invalidate_sessions: u64,
    /// `drop_login=N`: every increase forgets the login until the next C_Login.
    pub(crate) drop_login: u64,
    /// `device_error_rate=F`, clamped to 0.0..=1.0.
    pub(crate) device_error_rate: f64,
    /// `latency_ms=N`
    pub(crate) latency_ms: u64,
    /// `max_sessions=N` (absent or `none`: no limit).
    pub(crate) max_sessions: Option<u64>,
    /// `seed=N`: reseeds the fault PRNG whenever the value changes.
    pub(crate) seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            token_present: true,
            invalidate_sessions: 0,
            drop_login: 0,
            device_error_rate: 0.0,
            latency_ms: 0,
            max_sessions: None,
            seed: None,
        }
    }
}

impl Config {
    /// Parses `key=value` lines. Blank lines and lines starting with `#` are ignored; so are
    /// unknown keys and values that do not parse (the key keeps its default), so a half-written
    /// or hand-edited file never makes the module fail.
    pub(crate) fn parse(text: &str) -> Config {
        let mut c = Config::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "token" => match value {
                    "present" => c.token_present = true,
                    "absent" => c.token_present = false,
                    _ => {}
                },
                "invalidate_sessions" => {
                    if let Ok(n) = value.parse() {
                        c.invalidate_sessions = n;
                    }
                }
                "drop_login" => {
                    if let Ok(n) = value.parse() {
                        c.drop_login = n;
                    }
                }
                "device_error_rate" => {
                    if let Ok(f) = value.parse::<f64>() {
                        c.device_error_rate = clamp_rate(f);
                    }
                }
                "latency_ms" => {
                    if let Ok(n) = value.parse() {
                        c.latency_ms = n;
                    }
                }
                "max_sessions" => {
                    if value.is_empty() || value == "none" {
                        c.max_sessions = None;
                    } else if let Ok(n) = value.parse() {
                        c.max_sessions = Some(n);
                    }
                }
                "seed" => {
                    if let Ok(n) = value.parse() {
                        c.seed = Some(n);
                    }
                }
                _ => {}
            }
        }
        c
    }

    /// Writes the file text; `parse(render(c)) == c` for every clamped config.
    pub(crate) fn render(&self) -> String {
        let mut s = String::from("# faultpkcs11 control file (written by faultpkcs11::Control)\n");
        let token = if self.token_present {
            "present"
        } else {
            "absent"
        };
        // Writing to a String cannot fail.
        let _ = writeln!(s, "token={token}");
        let _ = writeln!(s, "invalidate_sessions={}", self.invalidate_sessions);
        let _ = writeln!(s, "drop_login={}", self.drop_login);
        let _ = writeln!(s, "device_error_rate={}", self.device_error_rate);
        let _ = writeln!(s, "latency_ms={}", self.latency_ms);
        if let Some(n) = self.max_sessions {
            let _ = writeln!(s, "max_sessions={n}");
        }
        if let Some(n) = self.seed {
            let _ = writeln!(s, "seed={n}");
        }
        s
    }
}

/// NaN and out-of-range rates become 0.0 or 1.0.
pub(crate) fn clamp_rate(f: f64) -> f64 {
    if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_no_faults() {
        assert_eq!(Config::parse(""), Config::default());
    }

    #[test]
    fn parses_every_key_and_ignores_junk() {
        let c = Config::parse(
            "# comment\n token = absent \ninvalidate_sessions=3\ndrop_login=2\n\
             device_error_rate=1.5\nlatency_ms=25\nmax_sessions=4\nseed=9\nbogus=1\nno equals\n",
        );
        assert!(!c.token_present);
        assert_eq!(c.invalidate_sessions, 3);
        assert_eq!(c.drop_login, 2);
        assert_eq!(c.device_error_rate, 1.0);
        assert_eq!(c.latency_ms, 25);
        assert_eq!(c.max_sessions, Some(4));
        assert_eq!(c.seed, Some(9));
        assert_eq!(Config::parse("max_sessions=none\n").max_sessions, None);
        assert_eq!(
            Config::parse("device_error_rate=NaN").device_error_rate,
            0.0
        );
        assert!(Config::parse("token=maybe").token_present);
    }

    #[test]
    fn render_round_trips() {
        let c = Config {
            token_present: false,
            invalidate_sessions: 7,
            drop_login: 1,
            device_error_rate: 0.25,
            latency_ms: 3,
            max_sessions: Some(2),
            seed: Some(42),
        };
        assert_eq!(Config::parse(&c.render()), c);
        assert_eq!(
            Config::parse(&Config::default().render()),
            Config::default()
        );
    }
}
