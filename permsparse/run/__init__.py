"""Run mechanics: where a run computes, what it may hold, and what survives an interruption.

In: a config and a device. Out: the placement of the model, a memory estimate checked before heavy work,
progress on disk that resumes a run, collective operations of several processes, progress bars and the
version that runs.

- :mod:`.placement`: the device, the compute dtype, and whether blocks wait on the host;
- :mod:`.memory`: what a run will hold, estimated before the heavy work;
- :mod:`.resume`: progress on disk, committed once per block, so an interrupted run resumes where it stopped;
- :mod:`.identity`: what a run's result depends on (model, tokenizer, calibration data, config, version),
  so progress is never resumed by another run;
- :mod:`.distributed`: the few ``torch.distributed`` collectives the pipeline needs;
- :mod:`.progress`: progress bars that also leave a line in the log;
- :mod:`.cache`: the folder of things built once (converted models, sampled text), replaced atomically;
- :mod:`.version`: the version of permsparse that runs, installed or not.
"""
