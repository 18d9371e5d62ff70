"""The probe methods on cached features: the batched linear heads, weighted k-NN, L-BFGS logistic
regression, and the one top-k scoring rule they share."""
