//! Compiles every `.proto` under the workspace's `proto/` folder with protox (no system
//! `protoc`), writes the encoded descriptor set for server reflection, and generates the
//! prost messages and tonic clients and servers.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut files = Vec::new();
    collect_protos(&proto_root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&proto_root])?;
    fs::write(out_dir.join("csp_descriptor.bin"), fds.encode_to_vec())?;

    // The error details our statuses carry (tonic-types has their Rust types): described by
    // reflection, so clients such as grpcurl can decode them.
    let vendor = manifest_dir.join("vendor");
    let details = vendor.join("google/rpc/error_details.proto");
    println!("cargo:rerun-if-changed={}", details.display());
    let rpc = protox::compile([&details], [&vendor])?;
    fs::write(out_dir.join("google_rpc_descriptor.bin"), rpc.encode_to_vec())?;

    tonic_prost_build::configure()
        // Every server states each of its RPCs: one not built yet answers UNIMPLEMENTED by
        // its own hand, so a forgotten RPC does not compile.
        .generate_default_stubs(false)
        .compile_fds(fds)?;
    Ok(())
}

fn collect_protos(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
