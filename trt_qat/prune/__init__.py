"""Smaller before it is quantized: structured channel pruning (Torch-Pruning, an optional extra) and 2:4 sparsity,
chained with QAT. See :mod:`trt_qat.prune.core`, :mod:`trt_qat.prune.sparsity` and :mod:`trt_qat.prune.slimming`."""
from trt_qat.prune.core import IMPORTANCES, check_target, count_macs_params, prune, pruned_copy
from trt_qat.prune.slimming import BNL1, bn_sparsity_train
from trt_qat.prune.sparsity import SparsityMasks, holds_2_4, mask_2_4, sparsify, sparsity_hook, sparsity_stats

__all__ = ["IMPORTANCES", "check_target", "count_macs_params", "prune", "pruned_copy", "BNL1", "bn_sparsity_train",
           "SparsityMasks", "holds_2_4", "mask_2_4", "sparsify", "sparsity_hook", "sparsity_stats"]
