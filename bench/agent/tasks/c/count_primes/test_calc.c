#include <assert.h>
#include <stdio.h>

#include "calc.h"

int main(void) {
    assert(count_primes(-5) == 0);
    assert(count_primes(0) == 0);
    assert(count_primes(2) == 0);
    assert(count_primes(3) == 1);
    assert(count_primes(10) == 4);
    assert(count_primes(11) == 4);
    assert(count_primes(12) == 5);
    assert(count_primes(100) == 25);
    assert(count_primes(1000) == 168);
    assert(count_primes(100000) == 9592);
    puts("all tests passed");
    return 0;
}
