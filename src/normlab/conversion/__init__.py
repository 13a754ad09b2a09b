"""Model conversion, one idea per module: what a layer is (recognize), the report of a
conversion (report), moving state from the old layer to the new (carry), building one
replacement (build), walking a model (traverse), the IBN-Net recipes (ibn) and the
switch to and from synchronized batch norm (sync). The public entry points are
:func:`normlab.convert`, :func:`normlab.freeze`, :func:`normlab.fold` and
``SyncBatchNorm.convert_sync_batchnorm``.
"""
