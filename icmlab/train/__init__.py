"""Train stage: fine-tune the run's model with the HF Trainer (``icmlab train P``).

Modules: :mod:`~icmlab.train.stage` (the one entry point, also of launched workers),
:mod:`~icmlab.train.args` (TrainingArguments and DeepSpeed config from the RunConfig),
:mod:`~icmlab.train.trainer` (the Trainer subclass: sampler, optimizer groups, vision touch),
:mod:`~icmlab.train.callbacks`, :mod:`~icmlab.train.launch` (deepspeed/torchrun),
:mod:`~icmlab.train.dataset` (lazy supervised dataset and collator), :mod:`~icmlab.train.packing`
and :mod:`~icmlab.train.live` (live metrics plot).

Usage (notebook ``05_train``)::

    from icmlab import train
    print(train.batch_message(cfg))
    result = train.run(cfg)
"""

from icmlab.train.args import batch_message
from icmlab.train.stage import TrainResult, run

__all__ = ["TrainResult", "batch_message", "run"]
