"""Shared helpers at the bottom of qatkit: errors, logging, files, caches, environment. They import no other qatkit package."""
