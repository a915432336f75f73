"""Curvature sources: Hessian-vector products, output cotangents and factor Gram matrices."""
