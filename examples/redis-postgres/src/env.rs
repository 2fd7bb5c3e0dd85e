//! Where the servers are: `REDIS_URL` and `DATABASE_URL`.

use std::{env, io::Write};

/// The two servers' URLs.
#[derive(Clone, Debug)]
pub struct Servers {
    /// e.g. `redis://127.0.0.1:6390/`
    pub redis_url: String,
    /// e.g. `postgres://postgres@127.0.0.1:5440/backstop`
    pub database_url: String,
}

const HOW: &str = "set REDIS_URL/DATABASE_URL or run `eval \"$(bash .ci/services.sh)\"`";

impl Servers {
    /// The servers named in the environment, if both are.
    pub fn from_env() -> Option<Servers> {
        Some(Servers {
            redis_url: env::var("REDIS_URL").ok().filter(|s| !s.is_empty())?,
            database_url: env::var("DATABASE_URL").ok().filter(|s| !s.is_empty())?,
        })
    }

    /// For a test: the servers, or `None` after printing why `test` is skipped. With
    /// `CI=true` missing servers are a failure, never a skip.
    pub fn for_test(test: &str) -> Option<Servers> {
        let servers = Servers::from_env();
        if servers.is_none() {
            if env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: CI=true but REDIS_URL/DATABASE_URL are not set ({HOW})");
            }
            // Straight to stderr: the test harness captures `println!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "\nskipped: {test} needs Redis and PostgreSQL ({HOW})"
            );
        }
        servers
    }

    /// For a command: the servers, or an error saying how to get them.
    pub fn required() -> Result<Servers, String> {
        Servers::from_env().ok_or_else(|| format!("Redis and PostgreSQL are needed: {HOW}"))
    }
}
