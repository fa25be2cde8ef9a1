"""Tensor parallelism applied to a built model from outside (the model code does not know it):

- `comm`: the rank's process group and the few collectives the sharded forward needs;
- `shard`: which slice of each weight a rank keeps, and the sharded model (vocabulary-parallel
  embedding and LM head, all-reduce after attention and MLP);
- `load`: a rank reads only its slices from a safetensors checkpoint;
- `launch`: start N local ranks, fail loudly when one dies;
- `lockstep`: rank 0 broadcasts a step plan, every rank runs the same call on its shard;
- `decode`: a plan executor over medusa.decoding.step (prefill, speculate) and a rank-0 driver,
  the demonstration of the protocol end to end.

Nothing here knows about requests, schedulers, Ray or serving."""
