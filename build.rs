//! Compiles `proto/kluis/v1/kluis.proto` with protox (pure Rust; no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["kluis/v1/kluis.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kluis_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, but a request body that does not decode is refused as
        // INVALID_ARGUMENT, logged and audited (src/service/decode.rs).
        .codec_path("crate::service::decode::Codec")
        // Messages that carry field values never derive Debug: PII stays out of logs by construction.
        .skip_debug([
            "kluis.v1.FieldValue",
            "kluis.v1.CreateRecordRequest",
            "kluis.v1.GetRecordResponse",
            "kluis.v1.UpdateRecordRequest",
            "kluis.v1.FindRecordsRequest",
            "kluis.v1.ExportRecordResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
