"""Matrix-free linear algebra on symmetric operators given as matvecs.

* `lanczos`: Lanczos tridiagonalization with full reorthogonalization, extreme eigenpairs;
* `spectral`: stochastic Lanczos quadrature (spectral densities, trace functions);
* `qr`: reduced QR that stays batched on GPUs (orthogonal initializers, Hutch++ sketches).
"""
