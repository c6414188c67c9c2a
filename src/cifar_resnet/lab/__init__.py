"""The lab: the tools that study, bench and check the pipeline. No stage imports them.

Each is a command, `python -m cifar_resnet.lab.<tool> --help`: seed_study, ablation, bench, gpu_check,
plots_template and repro_timing; the other modules are what those commands share.
"""
