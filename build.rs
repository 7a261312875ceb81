//! Compiles the gRPC and on-disk record schemas with a vendored `protoc`, so a fresh machine
//! needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Malformed requests answer INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::StrictCodec")
        .file_descriptor_set_path(out.join("strongroom_descriptor.bin"))
        // Messages that carry a secret value get a hand-written, redacting Debug (src/secret.rs).
        .skip_debug([
            "strongroom.v1.PutSecretRequest",
            "strongroom.v1.GetSecretResponse",
            "strongroom.v1.SealedRecordV1",
        ])
        .compile_with_config(
            config,
            &[
                "proto/strongroom/v1/secrets.proto",
                "proto/strongroom/v1/record.proto",
                "proto/strongroom/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
