"""Building the student before it trains.

    build.py            a model dir, or a recipe from the teacher's config; init from teacher layers
    select_layers.py    --init-layers auto: which teacher layers to keep, by the damage their removal does
    teacher_weights.py  the teacher's tensors read by name, one layer at a time
    layer_map.py        which teacher layers each student layer's hidden-state or attention loss reads
    bitnet.py, int8.py  1.58-bit (BitNet b1.58) students and int8 training matmuls
"""
