"""What training, validation, inspection and evaluation share: the input pipeline.

- :mod:`~icmlab.inputs.conversation`: chat templates and turns of a LLaVA-JSON record;
- :mod:`~icmlab.inputs.encode`: ids and labels by construction (the original code's tokenization);
- :mod:`~icmlab.inputs.collate`: padding into batches for training and generation;
- :mod:`~icmlab.inputs.images`: decoding, ``pad`` (expand2square) and CLIP preprocessing;
- :mod:`~icmlab.inputs.lengths`: token lengths of records with the model's tokenizer and template;
- :mod:`~icmlab.inputs.jsonscan`: the exact byte scanner of large LLaVA JSON files.

Nothing here imports a stage package; stages import from here.
"""
