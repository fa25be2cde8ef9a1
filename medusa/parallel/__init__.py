"""Tensor parallelism applied to a built model from outside (the model code does not know it):

- `comm`: the rank's process group and the few collectives the sharded forward needs;
- `shard`: which slice of each weight a rank keeps, and the sharded model (vocabulary-parallel
  embedding and LM head, all-reduce after attention and MLP);
- `load`: a rank reads only its slices from a safetensors checkpoint;
- `launch`: start N local ranks, fail loudly when one dies;
- `lockstep`: rank 0 broadcasts a step plan, every rank runs the same call on its shard;
- `replica`: the one Engine at TP N: rank 0 runs it, its runner's calls are replayed on every
  rank (the model the engine and heads see on a rank, too).

Nothing here knows about requests, schedulers, Ray or serving: the engine stays rank 0's."""
