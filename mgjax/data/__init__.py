"""Records to batches: image preprocessing, chat templates, samples (tokens, labels, images; bad samples counted
and reported), the loader and sequence packing, InternVL meta files and the task-to-VQA formatters. Above
``models``.
"""
