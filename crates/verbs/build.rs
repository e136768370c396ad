//! The verbs ABI's types, from rdma-core's own headers (libibverbs-dev),
//! so that every struct layout is exactly the one applications were built
//! against.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libibverbs.so.1");
    let b = bindgen::Builder::default()
        .header_contents("verbs.h", "#include <infiniband/verbs.h>\n")
        .allowlist_type("ibv_.*|_compat_ibv_.*|verbs_context")
        .allowlist_var("IBV_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .expect("bindgen over <infiniband/verbs.h> (packages libibverbs-dev and libclang-dev: ./scripts/deps.sh)");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    b.write_to_file(out.join("sys.rs")).expect("write bindings");
}
