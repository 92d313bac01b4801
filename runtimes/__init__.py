"""Sandboxes behind one interface (`runtimes.base`): wasm (wasmtime), container
(OCI via crun/runc, runsc for checkpointable tasks), microvm (Firecracker when
present, QEMU microvm otherwise). Nothing here imports `synord`."""
