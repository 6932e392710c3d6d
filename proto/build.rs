//! Generates the expertmesh.v1 and KServe v2 (`inference`) types and services with protoc (Debian's
//! `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Payloads stay `bytes::Bytes`: no copy between the wire and the codec.
        .bytes(".")
        .file_descriptor_set_path(out.join("expertmesh_descriptor.bin"))
        .compile_protos(&["expertmesh/v1/expertmesh.proto", "inference/grpc_service.proto"], &["."])?;
    println!("cargo:rerun-if-changed=expertmesh/v1/expertmesh.proto");
    println!("cargo:rerun-if-changed=inference/grpc_service.proto");
    Ok(())
}
