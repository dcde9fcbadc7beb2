#ifndef CALC_H
#define CALC_H

/* Returns how many prime numbers are strictly less than n (0 when n <= 2). */
int count_primes(int n);

#endif
