"""The benchmark library behind `medusa bench`: decode throughput per mode on a prompt set
(`decode`), the cost of one verification forward by query count and context (`step_cost`),
and batched serving throughput (`concurrency`), plus the run's environment (`env`) and the
JSON / markdown / PNG reports (`report`).

It measures; it does not decode on its own: every mode goes through
medusa.decoding.generate (the one decode step) or, for the `hf` baseline, through HF
transformers `generate`. Progress is reported through callbacks; bars live in the CLI."""
