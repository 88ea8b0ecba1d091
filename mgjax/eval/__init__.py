"""Evaluation: benchmark scoring (scoring), the harness behind ``python -m mgjax.eval`` (harness), teacher-forced
held-out accuracy (heldout) and Mini-InternVL's domain judges (domain_eval). Above ``inference``.
"""
