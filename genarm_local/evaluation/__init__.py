"""Judging guided text: the shipped ARMs' objectives and fluency measures (used by demo, bench/ and training
reports). Above core; imports no torch."""
