"""normlab.optim: Adaptive Gradient Clipping (NFNets) for any optimizer.

    >>> from normlab.optim import AGC, adaptive_grad_clip_, agc_parameters
"""

from normlab.optim.agc import (AGC, adaptive_grad_clip_, agc_parameters, classifier_names,
                               unitwise_norm)

__all__ = ["AGC", "adaptive_grad_clip_", "agc_parameters", "classifier_names", "unitwise_norm"]
