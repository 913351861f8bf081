//! Fault injection for tests: a scripted bad peer at the test's edge (a real node
//! that corrupts what it serves). Compiled in only with the `test-faults` feature,
//! which the tests crate turns on; a release build (`cargo build --release -p node`)
//! has none of it, not even the switch's name.

#[cfg(feature = "test-faults")]
mod imp {
    use tracing::warn;

    /// The switch: `CPUSHARE_TEST_FAULT=corrupt-chunks|tamper-manifest|truncate-manifest`.
    const FAULT_ENV: &str = "CPUSHARE_TEST_FAULT";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fault {
        None,
        CorruptChunks,
        TamperManifest,
        TruncateManifest,
    }

    impl Fault {
        /// The fault the environment asks for (loudly, when there is one).
        pub fn from_env() -> Fault {
            let fault = match std::env::var(FAULT_ENV).as_deref() {
                Ok("corrupt-chunks") => Fault::CorruptChunks,
                Ok("tamper-manifest") => Fault::TamperManifest,
                Ok("truncate-manifest") => Fault::TruncateManifest,
                _ => Fault::None,
            };
            if fault != Fault::None {
                warn!(
                    ?fault,
                    "TEST FAULT INJECTION ACTIVE: this node serves bad data on purpose"
                );
            }
            fault
        }

        /// The switch's value while a fault is active (shown in `status`, so a
        /// test can tell a binary built without the feature from a fault that
        /// did nothing).
        pub fn name(self) -> Option<&'static str> {
            match self {
                Fault::None => None,
                Fault::CorruptChunks => Some("corrupt-chunks"),
                Fault::TamperManifest => Some("tamper-manifest"),
                Fault::TruncateManifest => Some("truncate-manifest"),
            }
        }

        /// Spoils a manifest about to be served.
        pub fn manifest(self, b: &mut Vec<u8>) {
            match self {
                Fault::TamperManifest if !b.is_empty() => {
                    let i = b.len() / 2;
                    b[i] ^= 0x40;
                }
                Fault::TruncateManifest => b.truncate(b.len() / 2),
                _ => {}
            }
        }

        /// Spoils a chunk about to be served.
        pub fn chunk(self, b: &mut [u8]) {
            if self == Fault::CorruptChunks {
                if let Some(x) = b.first_mut() {
                    *x ^= 0xff;
                }
            }
        }
    }
}

#[cfg(not(feature = "test-faults"))]
mod imp {
    /// Without the `test-faults` feature: no fault, and nothing reads the environment.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Fault;

    impl Fault {
        pub fn from_env() -> Fault {
            Fault
        }

        pub fn name(self) -> Option<&'static str> {
            None
        }

        #[inline(always)]
        pub fn manifest(self, _: &mut Vec<u8>) {}

        #[inline(always)]
        pub fn chunk(self, _: &mut [u8]) {}
    }
}

pub use imp::Fault;
