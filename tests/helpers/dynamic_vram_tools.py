"""ComfyUI v0.33's dynamic VRAM (comfy-aimdo) forced on in a CPU process, for the scripts that test
the pack with it (tests/comfyui/comfy_partial_load.py, tests/comfyui/comfy_native_dynamic_vram.py).

With an NVIDIA GPU, ComfyUI's main.py loads comfy-aimdo's library, sets
`comfy.memory_management.aimdo_enabled` (which `comfy.ops` reads when it builds a layer: `weight =
None`, no storage reserved) and makes `comfy.model_patcher.CoreModelPatcher`, the class core builds
its models' patchers from, `ModelPatcherDynamic`. `force_on` does the same three things, and no more,
on the CPU, with one change: core hands a CPU load device to the classic patcher
(`ModelPatcherDynamic.__new__`) and refuses one in `partially_unload`, so `CoreModelPatcher` becomes
`DynamicOnCPU`, core's dynamic patcher with only those two steps skipped.

What this leaves untested, because it needs aimdo's CUDA side: the VBAR (the virtual VRAM that
pages a castable layer's weights into the GPU when a forward faults them, `cast_modules_with_vbar`,
the residency signatures), the aimdo cast buffers and pinned host buffers, freeing VRAM by the
VBAR's `free_memory` under pressure, `vbars_analyze` in the free-memory figures, fp8 storage
(dynamic VRAM casts a layer's weights to the MODEL's fp8 as it pages them in; on the CPU they stay in
the file's dtype), and the memory a real card has. On the CPU a dynamic patcher's castable layers get no VBAR allocation, so they
cast their weights from RAM through core's classic per-call cast; everything else of
`ModelPatcherDynamic` (which layers it stages, force-loads and backs up, its callbacks, its unload
putting the backups back) runs as core's own code.
"""


def load_library() -> None:
    """comfy-aimdo's library, as main.py loads it (with --reserve-vram as its VRAM headroom). Call
    after `comfy.options` has parsed the arguments and before any other comfy module is imported
    (comfy-aimdo's modules bind the library when they are imported); it changes nothing until
    `force_on` or `turn_on_gpu`."""
    import comfy.cli_args
    import comfy_aimdo.control

    args = comfy.cli_args.args
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
    if not comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure):
        raise RuntimeError("comfy-aimdo's library did not load")


def turn_on_gpu() -> None:
    """On an NVIDIA GPU: dynamic VRAM on, exactly as main.py turns it on (a script that imports
    ComfyUI's modules does not run main.py, so without this it runs with dynamic VRAM off)."""
    import comfy.cli_args
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy_aimdo.control

    headroom = int(comfy.cli_args.args.vram_headroom * 1024**3)
    devices = comfy.model_management.get_all_torch_devices()
    if not comfy_aimdo.control.init_devices((d.index, headroom) for d in devices):
        raise RuntimeError("comfy-aimdo did not start on this GPU")
    comfy.memory_management.aimdo_enabled = True
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic


def force_on():
    """Dynamic VRAM on, as main.py turns it on (after `load_library`): layers built from then on are
    built as with dynamic VRAM, and core's models get `DynamicOnCPU` patchers. Returns that class."""
    import comfy.memory_management
    import comfy.model_patcher

    class DynamicOnCPU(comfy.model_patcher.ModelPatcherDynamic):
        """Core's dynamic patcher, kept on a CPU load device (see the module's docstring)."""

        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            # core's, after its CPU assert: with no VBAR to free, the backups are put back
            return self.restore_loaded_backups() if memory_to_free > 0 else 0

    comfy.memory_management.aimdo_enabled = True
    comfy.model_patcher.CoreModelPatcher = DynamicOnCPU
    return DynamicOnCPU
