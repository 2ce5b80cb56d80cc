"""The commands and what they share: commands.py (exit codes, one-line errors, quiet logs), startup.py (no
accelerator runtimes' start-up lines where there is no accelerator), convert.py
(k2jax-convert), demo.py (k2jax-demo, write_tiny_release), aot.py (k2jax-aot) with hlo_cost.py (FLOPs, bytes and
collectives of a compiled program), host_memory.py (XLA:CPU runs keep freed buffers)."""
