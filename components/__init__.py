"""Kubeflow components: one module per pipeline step (convert, train, validate, export, quantize).

Each module holds the step's function (the component's ``python_func``, which calls segcore), a
``component(image)`` factory and a component made with the default image (``<step>_op``).
"""
