//! The fault module (crates/faultpkcs11) in front of the test's token: a service whose
//! PKCS#11 calls fail on demand.

use faultpkcs11::Control;

use super::{Server, TestEnv};

impl TestEnv {
    /// Starts `strongroomd` with the configuration `extra` (as [`TestEnv::config`] takes it)
    /// and the fault module as its PKCS#11 module, in front of the test's token; no fault is
    /// set until the returned control sets one.
    pub fn start_behind_faults(&self, extra: &str) -> (Server, Control) {
        let lib = faultpkcs11::library_path().expect("libfaultpkcs11.so is built with the tests");
        let control = Control::new(self.dir.path().join("faults.ctl"));
        control.clear().unwrap();
        let config = self.config(extra);
        let text = std::fs::read_to_string(&config).unwrap().replace(
            &format!("module = \"{}\"", self.module.display()),
            &format!("module = \"{}\"", lib.display()),
        );
        std::fs::write(&config, text).unwrap();
        let server = self.start_with(
            &config,
            &[
                // The fixture points STRONGROOM_PKCS11_MODULE at the token; point it at the shim.
                ("STRONGROOM_PKCS11_MODULE", lib.to_str().unwrap()),
                (faultpkcs11::ENV_MODULE, self.module.to_str().unwrap()),
                (faultpkcs11::ENV_CONTROL, control.path().to_str().unwrap()),
            ],
        );
        (server, control)
    }
}
