// rmsnorm: placeholder, to be written
#pragma once
