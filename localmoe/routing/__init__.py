"""Routing: which tier answers a question (small, large or remote), with a score, a threshold and a reason; how the
router is trained on the user's runs and labels, and how a routing policy is evaluated."""
