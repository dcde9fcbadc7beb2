#ifndef CALC_H
#define CALC_H

/* Parses a whole string as a decimal int: an optional '+' or '-' followed by one or more
 * digits, nothing else (no spaces). On success stores the value in *out and returns 0.
 * Returns -1, leaving *out unchanged, for an empty string, a sign alone, any other
 * character, or a value outside the range of int (INT_MIN..INT_MAX). */
int parse_int(const char *s, int *out);

#endif
