"""The verl plug-in's implementation; the public module is :mod:`rlvr_kernels.integrations.verl`.

One concern per module:

- ``options``: the ``rlvr_*`` loss names, the ``policy_loss.rlvr`` keys and their checks, ``RLVRPolicyLossConfig``
  and the batch keys the hooks add;
- ``context``: the training step and the per-micro-batch loss context (the plug-in's only process state);
- ``losses``: the ``rlvr_*`` policy losses and their registration with verl;
- ``forward``: the fused forward (``patch_forward_with_rlvr``) and the ``impl_backend=rlvr*`` hooks;
- ``delta_worker``: the DelTA coefficients, estimated inside the worker at the start of an actor update;
- ``hooks``: the trainer / worker / config / engine hooks and their installation.

The method names and options come from the catalogue (:mod:`rlvr_kernels.methods`), never from lists kept here.
Importing this package does nothing by itself; importing the public module registers the losses and installs the
hooks.
"""
